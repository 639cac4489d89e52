"""Tokenize raw text into the MDS shards that training streams: python data_prep/convert_to_mds.py --help."""

from __future__ import annotations

import argparse
import sys

from flexbert.data.convert import (DEFAULT_MAX_BAD_FRACTION, DEFAULT_SHARD_SIZE, DEFAULT_UNIT_SIZE,
                                   ConversionError, convert_to_mds)
from flexbert.data.sources import SourceError
from flexbert.data.tokenizer import TokenizerError

DESCRIPTION = """\
Tokenize a corpus into a pre-tokenized MDS dataset (mosaicml-streaming): one sample per document
with one column, input_ids, holding the document's token ids without special tokens, as
ndarray:uint16 (ndarray:uint32 for vocabularies over 65536 tokens), never truncated. Shards are
zstd-compressed. Documents with no tokens are skipped.

Inputs may be files or folders, mixed:
  *.txt, *.md                  one document per file
  *.jsonl, *.jsonl.gz, *.jsonl.zst
                               one document per line, its text in --text-field
  *.parquet                    one document per row, its text in the --text-field column
  a folder from save_to_disk   a Hugging Face dataset (one split), text in --text-field
  any other folder             every file and saved dataset above under it, recursively, sorted
                               by name, hidden entries skipped; other files are ignored

Records that give no document (lines that are not UTF-8 or not JSON, a missing, null or
non-string text field) are counted by reason and skipped; the conversion fails only when more than
--max-bad-fraction of all records are bad, naming the file and position of the first of each kind.

The output is complete when OUTPUT/index.json exists; it is written last. An interrupted run, or
one stopped by a full disk, leaves no index.json, and running the same command again converts only
what is left. OUTPUT may be s3://bucket/prefix: set S3_ENDPOINT_URL for a non-AWS endpoint,
credentials as for boto3.
"""

EPILOG = """\
examples:
  python data_prep/convert_to_mds.py --input corpus/ --output data/mds --tokenizer tokenizers/modernbert
  python data_prep/convert_to_mds.py --input a.jsonl.zst b.parquet --output s3://bucket/mds --text-field content

Errors in the request (missing input, unknown tokenizer, an output that is already complete, too
many bad records, an empty corpus) and a full disk print one line, "convert_to_mds: error: ...",
and exit with 2.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="convert_to_mds", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="files and folders to convert, in this order")
    parser.add_argument("--output", required=True, metavar="DIR_OR_URL",
                        help="output folder, or s3://bucket/prefix")
    parser.add_argument("--tokenizer", required=True, metavar="DIR",
                        help="tokenizer folder holding tokenizer.json (e.g. tokenizers/modernbert, shipped with the project)")
    parser.add_argument("--text-field", default="text",
                        help="JSON key or column holding each document's text (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="processes to use (default: every available core)")
    parser.add_argument("--max-bad-fraction", type=float, default=DEFAULT_MAX_BAD_FRACTION, metavar="F",
                        help="fail if more than this fraction of records are bad (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output that is already complete (or restart a partial one)")
    parser.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE, metavar="SIZE",
                        help="largest uncompressed shard, e.g. 64MB (default: %(default)s)")
    parser.add_argument("--unit-size", default=DEFAULT_UNIT_SIZE, metavar="SIZE",
                        help="input bytes per work unit: the grain of parallelism and of resuming; a "
                             "compressed file is always one unit (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = convert_to_mds(
            args.input, args.output, args.tokenizer, text_field=args.text_field, workers=args.workers,
            max_bad_fraction=args.max_bad_fraction, overwrite=args.overwrite, shard_size=args.shard_size,
            unit_size=args.unit_size, progress=not args.no_progress,
        )
    except (ConversionError, SourceError, TokenizerError) as err:
        print(f"convert_to_mds: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"convert_to_mds: interrupted; run the same command again to resume {args.output}", file=sys.stderr)
        return 130  # the shell's status for a command stopped by Ctrl-C
    print(f"convert_to_mds: {summary.line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
