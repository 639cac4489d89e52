"""``flexbert prepare``: the data steps before training, from raw text to the MDS shards it streams.

    flexbert prepare corpus OUT                       # the embedded demo corpus, from this Python install
    flexbert prepare tokenizer --input ... --output DIR
    flexbert prepare tokenizer --extend SOURCE_DIR --input ... --add N --output DIR   # grow a tokenizer
    flexbert prepare mds --input ... --output DIR_OR_URL --tokenizer DIR [--part I/N]
    flexbert prepare merge DIR_OR_URL --parts N        # the parts of N jobs, as one dataset
    flexbert prepare retrieval --task code-search|stsb --output DIR   # a retrieval benchmark, offline

Each step writes its output whole or not at all (``mds`` resumes where an interrupted run stopped),
and its errors are :class:`~flexbert.errors.FlexBertError`, printed by the command line as one line.
"""

from __future__ import annotations

import argparse
import sys
import time

from flexbert.core.sources import SUFFIX_KINDS
from flexbert.data.convert import (
    DEFAULT_MAX_BAD_FRACTION,
    DEFAULT_SHARD_SIZE,
    DEFAULT_UNIT_SIZE,
    convert_to_mds,
    merge_parts,
)
from flexbert.data.demo_corpus import (
    DEFAULT_MAX_BYTES_PER_SOURCE,
    MAX_DOCUMENT_SHARE,
    PART,
    SCIENCE_PACKAGES,
    build_demo_corpus,
)
from flexbert.data.retrieval_tasks import (
    DEFAULT_PACKAGES,
    MIN_PARAPHRASE_SCORE,
    STSB_FILES,
    TASKS,
    build_code_search,
    build_stsb,
)
from flexbert.data.tokenizer_extension import TokenizerExtensionError, extend_tokenizer
from flexbert.data.tokenizer_training import (
    DEFAULT_MODEL_MAX_LENGTH,
    DEFAULT_VOCAB_SIZE,
    SPECIAL_TOKENS,
    VOCAB_MULTIPLE,
    train_tokenizer,
)

MDS_DESCRIPTION = """\
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

MDS_EPILOG = """\
examples:
  flexbert prepare mds --input corpus/ --output data/mds --tokenizer tokenizers/modernbert
  flexbert prepare mds --input a.jsonl.zst b.parquet --output s3://bucket/mds --text-field content

Errors in the request (missing input, unknown tokenizer, an output that is already complete, too
many bad records, an empty corpus) and a full disk print one line, "flexbert: error: ...",
and exit with 2.
"""


def _corpus(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    manifest = build_demo_corpus(
        args.output, args.max_bytes_per_source, overwrite=args.overwrite, progress=not args.no_progress
    )
    counts = ", ".join(
        f"{name} {stats['documents']} documents / {stats['bytes']:,} bytes"
        for name, stats in manifest["sources"].items()
    )
    print(f"flexbert prepare corpus: {counts} -> {args.output} in {time.perf_counter() - start:.1f}s")
    return 0


def _skipped(bad_records: dict[str, int]) -> str:
    return "".join(f", {number} skipped ({reason})" for reason, number in bad_records.items())


def _extend(args: argparse.Namespace) -> int:
    if args.add is None:
        raise TokenizerExtensionError("--extend needs --add N, the number of tokens to learn")
    if args.vocab_size is not None:
        raise TokenizerExtensionError("--vocab-size does not go with --extend: the size follows from --add")
    summary = extend_tokenizer(
        args.extend,
        args.input,
        args.output,
        add=args.add,
        text_field=args.text_field,
        min_frequency=args.min_frequency,
        model_max_length=args.model_max_length,
        overwrite=args.overwrite,
        show_progress=not args.no_progress,
    )
    print(
        f"flexbert prepare tokenizer: extended {summary.source_dir} to vocab {summary.vocab_size} "
        f"({summary.source_vocab_size} + {summary.new_tokens} new of {args.add} asked + {summary.unused_tokens} "
        f"unused); corpus tokens {summary.source_tokens:,} -> {summary.tokens:,} "
        f"({-100 * summary.reduction:+.1f}%), {summary.documents} documents{_skipped(summary.bad_records)} "
        f"-> {summary.output_dir}"
    )
    return 0


def _tokenizer(args: argparse.Namespace) -> int:
    if args.extend is not None:
        return _extend(args)
    if args.add is not None:
        raise TokenizerExtensionError("--add needs --extend SOURCE_DIR, the tokenizer to add tokens to")
    summary = train_tokenizer(
        args.input,
        args.output,
        vocab_size=DEFAULT_VOCAB_SIZE if args.vocab_size is None else args.vocab_size,
        text_field=args.text_field,
        min_frequency=args.min_frequency,
        model_max_length=DEFAULT_MODEL_MAX_LENGTH if args.model_max_length is None else args.model_max_length,
        overwrite=args.overwrite,
        show_progress=not args.no_progress,
    )
    print(
        f"flexbert prepare tokenizer: vocab {summary.vocab_size} ({summary.bpe_vocab_size} BPE + "
        f"{len(SPECIAL_TOKENS)} special + {summary.unused_tokens} unused), {summary.documents} documents"
        f"{_skipped(summary.bad_records)} -> {summary.output_dir}"
    )
    return 0


def _mds(args: argparse.Namespace) -> int:
    try:
        summary = convert_to_mds(
            args.input,
            args.output,
            args.tokenizer,
            text_field=args.text_field,
            workers=args.workers,
            max_bad_fraction=args.max_bad_fraction,
            overwrite=args.overwrite,
            shard_size=args.shard_size,
            unit_size=args.unit_size,
            progress=not args.no_progress,
            part=args.part,
        )
    except KeyboardInterrupt:
        print(f"flexbert prepare mds: interrupted; run the same command again to resume {args.output}", file=sys.stderr)
        return 130  # the shell's status for a command stopped by Ctrl-C
    print(f"flexbert prepare mds: {summary.line()}")
    return 0


def _part(text: str) -> tuple[int, int]:
    """``I/N`` as (I, N)."""
    index, _, parts = text.partition("/")
    if not (index.isdigit() and parts.isdigit() and int(index) < int(parts)):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, such as 0/8, got {text!r}")
    return int(index), int(parts)


def _merge(args: argparse.Namespace) -> int:
    shards = merge_parts(args.output, args.parts, overwrite=args.overwrite)
    print(f"flexbert prepare merge: {args.parts} parts, {shards} shards -> {args.output}")
    return 0


def _retrieval(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.task == "code-search":
        manifest = build_code_search(args.output, args.seed, overwrite=args.overwrite, progress=not args.no_progress)
    else:
        manifest = build_stsb(args.output, args.glue, overwrite=args.overwrite)
    splits = manifest["splits"].items()
    counts = ", ".join(f"{name} {stats['queries']} queries / {stats['documents']} documents" for name, stats in splits)
    print(f"flexbert prepare retrieval: {args.task}: {counts} -> {args.output} in {time.perf_counter() - start:.1f}s")
    return 0


def _configure_prepare(prepare: argparse.ArgumentParser) -> None:
    """``prepare corpus | tokenizer | mds | merge | retrieval``, each a step of its own."""
    prepare.description = "The data steps before training: corpus -> tokenizer -> MDS shards."
    steps = prepare.add_subparsers(dest="step", required=True, metavar="STEP")

    corpus = steps.add_parser(
        "corpus",
        help="write the embedded demo corpus (code, science, web) from this Python installation",
        description=(
            "Write a small three-source text corpus drawn from this Python installation alone: "
            "code (the standard library's source), science (docstrings of installed "
            f"{', '.join(SCIENCE_PACKAGES)}, one document per module) and web (installed packages' "
            f"long descriptions from their METADATA). Each source goes to OUT/<source>/{PART} as "
            "JSON lines with id, source and text fields, and OUT/manifest.json counts documents and "
            "bytes per source. Two runs in the same environment write identical bytes."
        ),
    )
    corpus.add_argument(
        "output", metavar="OUT", help="directory to write; built beside OUT and renamed into place when complete"
    )
    corpus.add_argument(
        "--max-bytes-per-source",
        type=int,
        default=DEFAULT_MAX_BYTES_PER_SOURCE,
        metavar="N",
        help=f"stop each source before its file passes N bytes; documents over N/{MAX_DOCUMENT_SHARE} "
        f"bytes are left out (default: {DEFAULT_MAX_BYTES_PER_SOURCE})",
    )
    corpus.add_argument("--overwrite", action="store_true", help="replace OUT if it already exists and is not empty")
    corpus.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    corpus.set_defaults(run=_corpus)

    tokenizer = steps.add_parser(
        "tokenizer",
        help="train a byte-level BPE tokenizer with ModernBERT's special tokens on local text, or extend one",
        description=(
            "Train a byte-level BPE tokenizer and save it as a Hugging Face tokenizer directory "
            "(tokenizer.json, tokenizer_config.json, special_tokens_map.json) that "
            "transformers.AutoTokenizer and flexbert's load_tokenizer both read. The vocabulary is "
            f"the BPE tokens, then {' '.join(SPECIAL_TOKENS)} on consecutive ids, then [unusedN] "
            f"tokens up to a multiple of {VOCAB_MULTIPLE}; sequences are framed as [CLS] A [SEP] "
            "and pairs as [CLS] A [SEP] B [SEP]. "
            "With --extend SOURCE_DIR --add N, extend an existing byte-level BPE tokenizer instead: BPE "
            "training continues from how the source splits the corpus, and up to N new tokens (the most "
            "frequent merges the source lacks) take the ids after the source's, then [unusedN] tokens pad "
            f"the ids to a multiple of {VOCAB_MULTIPLE}. Every existing id and special token stays; the "
            "summary gives how many tokens fewer the corpus takes."
        ),
    )
    tokenizer.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help=f"corpus files ({', '.join(SUFFIX_KINDS)}), datasets saved with save_to_disk, or folders "
        "searched recursively for them; a text file is one document, a JSON-lines record or a row "
        "one document. Records without usable text are skipped and counted in the summary",
    )
    tokenizer.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="directory to write; it is built beside DIR and renamed into place only when complete",
    )
    tokenizer.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        metavar="N",
        help=f"total vocabulary size including special and unused tokens, rounded up to a multiple "
        f"of {VOCAB_MULTIPLE} (default: {DEFAULT_VOCAB_SIZE}, ModernBERT's); not with --extend",
    )
    tokenizer.add_argument(
        "--extend",
        metavar="SOURCE_DIR",
        help="extend this byte-level BPE tokenizer directory (e.g. tokenizers/modernbert) with tokens learnt "
        "from --input, instead of training one from scratch",
    )
    tokenizer.add_argument(
        "--add",
        type=int,
        metavar="N",
        help="with --extend: learn at most N new tokens, fewer if the corpus offers fewer pairs seen "
        "--min-frequency times",
    )
    tokenizer.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="field (JSON lines) or column (parquet) holding each document's text (default: text)",
    )
    tokenizer.add_argument(
        "--min-frequency",
        type=int,
        default=2,
        metavar="N",
        help="learn a merge (a new token, with --extend) only if the pair occurs at least N times in the "
        "corpus (default: 2)",
    )
    tokenizer.add_argument(
        "--model-max-length",
        type=int,
        default=None,
        metavar="N",
        help="longest sequence the saved tokenizer reports to transformers (default: "
        f"{DEFAULT_MODEL_MAX_LENGTH}; with --extend, the source's)",
    )
    tokenizer.add_argument(
        "--overwrite",
        action="store_true",
        help="replace DIR if it already exists and is not empty (otherwise that is an error)",
    )
    tokenizer.add_argument("--no-progress", action="store_true", help="do not show the progress bars")
    tokenizer.set_defaults(run=_tokenizer)

    mds = steps.add_parser(
        "mds",
        help="tokenize text into the MDS shards that training streams",
        description=MDS_DESCRIPTION,
        epilog=MDS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mds.add_argument(
        "--input", nargs="+", required=True, metavar="PATH", help="files and folders to convert, in this order"
    )
    mds.add_argument("--output", required=True, metavar="DIR_OR_URL", help="output folder, or s3://bucket/prefix")
    mds.add_argument(
        "--tokenizer",
        required=True,
        metavar="DIR",
        help=(
            "tokenizer folder holding tokenizer.json (e.g. tokenizers/modernbert, shipped with the project), "
            "or the model directory a run continues (init_from.hf), which holds its own"
        ),
    )
    mds.add_argument(
        "--text-field", default="text", help="JSON key or column holding each document's text (default: %(default)s)"
    )
    mds.add_argument(
        "--workers", type=int, default=None, metavar="N", help="processes to use (default: every available core)"
    )
    mds.add_argument(
        "--max-bad-fraction",
        type=float,
        default=DEFAULT_MAX_BAD_FRACTION,
        metavar="F",
        help="fail if more than this fraction of records are bad (default: %(default)s)",
    )
    mds.add_argument(
        "--overwrite", action="store_true", help="replace an output that is already complete (or restart a partial one)"
    )
    mds.add_argument(
        "--shard-size",
        default=DEFAULT_SHARD_SIZE,
        metavar="SIZE",
        help="largest uncompressed shard, e.g. 64MB (default: %(default)s)",
    )
    mds.add_argument(
        "--unit-size",
        default=DEFAULT_UNIT_SIZE,
        metavar="SIZE",
        help="input bytes per work unit: the grain of parallelism and of resuming; a "
        "compressed file is always one unit (default: %(default)s)",
    )
    mds.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    mds.add_argument(
        "--part",
        type=_part,
        metavar="I/N",
        help="convert only the I-th of N equal runs of the corpus's units (I from 0), into "
        "OUTPUT/part-IIIII-of-NNNNN (zero-padded): N jobs (a SLURM array, say) share the work; join them with "
        "prepare merge",
    )
    mds.set_defaults(run=_mds)

    merge = steps.add_parser(
        "merge",
        help="join the parts that prepare mds --part I/N wrote into one dataset",
        description="Write OUTPUT/index.json listing the shards of the parts OUTPUT/part-IIIII-of-NNNNN in "
        "order (mosaicml-streaming's index merge), so that a stream reads the whole corpus, in corpus order. "
        "Every part must be complete; the parts' files stay where they are.",
    )
    merge.add_argument("output", metavar="OUTPUT", help="the --output the parts were converted to (folder or s3://)")
    merge.add_argument("--parts", type=int, required=True, metavar="N", help="how many parts the corpus was cut into")
    merge.add_argument("--overwrite", action="store_true", help="merge again over an existing index.json")
    merge.set_defaults(run=_merge)

    packages = {name: ", ".join(package.module for package in group) for name, group in DEFAULT_PACKAGES.items()}
    retrieval = steps.add_parser(
        "retrieval",
        help="build a retrieval benchmark offline (code search, STS-B paraphrases) for flexbert eval-retrieval",
        description="Write a retrieval task in BEIR's layout: DIR/{train,eval}/queries.jsonl, corpus.jsonl and "
        "qrels.tsv, and DIR/manifest.json (sources, versions, filters, counts). code-search is built as "
        "CodeSearchNet was, from installed packages: each function or method with a docstring becomes a query "
        "(the docstring's first paragraph) and its one relevant document (the function without its docstring); "
        f"train draws on {packages['train']}, eval on the held-out {packages['eval']}. stsb reads GLUE's "
        f"{STSB_FILES['train']} (train) and {STSB_FILES['eval']} (eval): a pair scored {MIN_PARAPHRASE_SCORE:g} or "
        "more makes its first sentence a query and its second the relevant document, among every second "
        "sentence of the split. Two runs in the same environment write identical bytes.",
    )
    retrieval.add_argument("--task", required=True, choices=TASKS, help="the benchmark to build")
    retrieval.add_argument(
        "--output", required=True, metavar="DIR", help="directory to write; built beside DIR and renamed into place"
    )
    retrieval.add_argument(
        "--glue", default="data/glue", metavar="DIR", help="stsb: the GLUE folder holding STS-B/ (default: data/glue)"
    )
    retrieval.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="code-search: the seed drawing a split's pairs beyond its cap (default: 0)",
    )
    retrieval.add_argument("--overwrite", action="store_true", help="replace DIR if it already exists and is not empty")
    retrieval.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    retrieval.set_defaults(run=_retrieval)


PARSERS = {"prepare": _configure_prepare}
