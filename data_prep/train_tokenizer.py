"""Train a byte-level BPE tokenizer with ModernBERT's special-token layout on local text.

    python data_prep/train_tokenizer.py --input corpus/ extra.jsonl.zst --output tokenizers/mine
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flexbert.data.atomic_output import OutputExistsError
from flexbert.data.sources import SUFFIX_KINDS, SourceError
from flexbert.data.tokenizer_training import (
    DEFAULT_MODEL_MAX_LENGTH, DEFAULT_VOCAB_SIZE, SPECIAL_TOKENS, VOCAB_MULTIPLE, TokenizerTrainingError,
    train_tokenizer,
)

PROG = "train_tokenizer"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Train a byte-level BPE tokenizer and save it as a Hugging Face tokenizer directory "
            "(tokenizer.json, tokenizer_config.json, special_tokens_map.json) that "
            "transformers.AutoTokenizer and flexbert's load_tokenizer both read. The vocabulary is "
            f"the BPE tokens, then {' '.join(SPECIAL_TOKENS)} on consecutive ids, then [unusedN] "
            f"tokens up to a multiple of {VOCAB_MULTIPLE}; sequences are framed as [CLS] A [SEP] "
            "and pairs as [CLS] A [SEP] B [SEP]."
        ),
    )
    parser.add_argument(
        "--input", nargs="+", required=True, metavar="PATH",
        help=f"corpus files ({', '.join(SUFFIX_KINDS)}), datasets saved with save_to_disk, or folders "
        "searched recursively for them; a text file is one document, a JSON-lines record or a row "
        "one document. Records without usable text are skipped and counted in the summary",
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR",
        help="directory to write; it is built beside DIR and renamed into place only when complete",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, metavar="N",
        help=f"total vocabulary size including special and unused tokens, rounded up to a multiple "
        f"of {VOCAB_MULTIPLE} (default: {DEFAULT_VOCAB_SIZE}, ModernBERT's)",
    )
    parser.add_argument(
        "--text-field", default="text", metavar="NAME",
        help="field (JSON lines) or column (parquet) holding each document's text (default: text)",
    )
    parser.add_argument(
        "--min-frequency", type=int, default=2, metavar="N",
        help="learn a merge only if the pair occurs at least N times in the corpus (default: 2)",
    )
    parser.add_argument(
        "--model-max-length", type=int, default=DEFAULT_MODEL_MAX_LENGTH, metavar="N",
        help=f"longest sequence the saved tokenizer reports to transformers (default: {DEFAULT_MODEL_MAX_LENGTH})",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace DIR if it already exists and is not empty (otherwise that is an error)",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not show the training progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = train_tokenizer(
            args.input, args.output, vocab_size=args.vocab_size, text_field=args.text_field,
            min_frequency=args.min_frequency, model_max_length=args.model_max_length,
            overwrite=args.overwrite, show_progress=not args.no_progress,
        )
    except (SourceError, OutputExistsError, TokenizerTrainingError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    skipped = "".join(f", {number} skipped ({reason})" for reason, number in summary.bad_records.items())
    print(
        f"{PROG}: vocab {summary.vocab_size} ({summary.bpe_vocab_size} BPE + {len(SPECIAL_TOKENS)} special "
        f"+ {summary.unused_tokens} unused), {summary.documents} documents{skipped} -> {summary.output_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
