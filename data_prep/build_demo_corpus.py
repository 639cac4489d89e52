"""Build the embedded demo corpus (code, science, web) from this Python installation, with no network.

    python data_prep/build_demo_corpus.py data/demo_corpus
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from flexbert.data.atomic_output import OutputExistsError
from flexbert.data.demo_corpus import (
    DEFAULT_MAX_BYTES_PER_SOURCE, MAX_DOCUMENT_SHARE, PART, SCIENCE_PACKAGES, DemoCorpusError, build_demo_corpus,
)

PROG = "build_demo_corpus"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Write a small three-source text corpus drawn from this Python installation alone: "
            "code (the standard library's source), science (docstrings of installed "
            f"{', '.join(SCIENCE_PACKAGES)}, one document per module) and web (installed packages' "
            f"long descriptions from their METADATA). Each source goes to OUT/<source>/{PART} as "
            "JSON lines with id, source and text fields, and OUT/manifest.json counts documents and "
            "bytes per source. Two runs in the same environment write identical bytes."
        ),
    )
    parser.add_argument(
        "output", metavar="OUT", help="directory to write; built beside OUT and renamed into place when complete",
    )
    parser.add_argument(
        "--max-bytes-per-source", type=int, default=DEFAULT_MAX_BYTES_PER_SOURCE, metavar="N",
        help=f"stop each source before its file passes N bytes; documents over N/{MAX_DOCUMENT_SHARE} "
        f"bytes are left out (default: {DEFAULT_MAX_BYTES_PER_SOURCE})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it already exists and is not empty")
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = build_demo_corpus(
            args.output, args.max_bytes_per_source, overwrite=args.overwrite, progress=not args.no_progress,
        )
    except (DemoCorpusError, OutputExistsError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(
        f"{name} {stats['documents']} documents / {stats['bytes']:,} bytes"
        for name, stats in manifest["sources"].items()
    )
    print(f"{PROG}: {counts} -> {args.output} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
