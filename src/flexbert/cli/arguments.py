"""Arguments that several commands share, worded once."""

from __future__ import annotations

import argparse

from flexbert.core.embedders import POOLINGS


def add_pooling_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pooling",
        choices=POOLINGS,
        help="the document vector: the [CLS] token's (cls) or the mean of all tokens (mean); required "
        "unless MODEL is an embedding fine-tune's checkpoint, which knows its own",
    )
