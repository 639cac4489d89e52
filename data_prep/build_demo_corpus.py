"""Build the embedded demo corpus (code, science, web) from this Python installation, with no network.

The same as `flexbert prepare corpus`; run it with --help for its options.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from flexbert.cli import main as flexbert_main


def main(argv: Sequence[str] | None = None) -> int:
    return flexbert_main(["prepare", "corpus", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
