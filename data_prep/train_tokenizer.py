"""Train a byte-level BPE tokenizer with ModernBERT's special-token layout on local text.

The same as `flexbert prepare tokenizer`; run it with --help for its options.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from flexbert.cli import main as flexbert_main


def main(argv: Sequence[str] | None = None) -> int:
    return flexbert_main(["prepare", "tokenizer", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
