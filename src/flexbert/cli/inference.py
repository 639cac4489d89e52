"""The commands that use a trained model (``pip install flexbert``, no training stack): ``encode``
embeds a corpus into shards, ``eval-retrieval`` scores a model on a retrieval task."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import asdict
from pathlib import Path

from flexbert.cli.arguments import add_pooling_argument
from flexbert.core.beir import SPLITS, read_split
from flexbert.core.colbert import late_interaction_run_config, late_interaction_scorer
from flexbert.core.embedders import load_embedder, with_max_seq_len
from flexbert.core.encode import DEFAULT_MAX_TOKENS_PER_BATCH, DEFAULT_SHARD_SIZE, encode_corpus, open_corpus
from flexbert.core.retrieval import dense_scorer, evaluate


def _cmd_encode(args: argparse.Namespace) -> int:
    corpus = open_corpus(args.input, args.text_field)
    embedder = load_embedder(args.model, args.pooling)
    if args.max_seq_len is not None:
        embedder = with_max_seq_len(embedder, args.max_seq_len, "--max-seq-len")
    if args.tokenizer is not None:
        embedder = dataclasses.replace(embedder, tokenizer_dir=Path(args.tokenizer))
    summary = encode_corpus(
        embedder,
        corpus,
        args.out,
        args.format,
        args.shard_size,
        args.max_tokens_per_batch,
        progress=not args.no_progress,
    )
    if summary.truncated:
        print(
            f"flexbert: note: {summary.truncated} documents were longer than {embedder.max_seq_len} tokens; "
            "their ends were cut",
            file=sys.stderr,
        )
    rate = summary.tokens / summary.seconds if summary.seconds else 0.0
    print(
        f"{args.out}: {summary.documents} documents; shards: {summary.shards_written} written, "
        f"{summary.shards_skipped} already there; {summary.tokens:,} tokens embedded in {summary.seconds:.1f}s "
        f"({rate:,.0f} tokens/s)"
    )
    return 0


def _configure_encode(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Embed every document of INPUT with MODEL into OUT/part-NNNNN.npy (float32 "
        "[documents, hidden], with OUT/part-NNNNN.ids.npy holding each row's position in the corpus) or "
        "OUT/part-NNNNN.parquet (columns id and embedding), in corpus order. Documents are framed as "
        "[CLS] text [SEP], cut at --max-seq-len tokens, and embedded in unpadded, length-sorted batches "
        "(bf16 on a GPU). Running the same command again skips the shards already written. INPUT is a "
        "corpus as flexbert prepare mds reads it (JSON lines, Parquet, a folder of .txt/.md files, a saved "
        "dataset) or an MDS dataset it wrote."
    )
    parser.add_argument(
        "model", metavar="MODEL", help="a checkpoint of this project, or a Hugging Face ModernBERT directory"
    )
    parser.add_argument("input", metavar="INPUT", help="the corpus: a file, a folder, or an MDS dataset folder")
    parser.add_argument("out", metavar="OUT", help="the folder of shards to write (or to complete)")
    add_pooling_argument(parser)
    parser.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="field (JSON lines) or column (Parquet, saved dataset) holding each document's text (default: text)",
    )
    parser.add_argument("--format", choices=("npy", "parquet"), default="npy", help="shard files (default: npy)")
    parser.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        metavar="N",
        help=f"documents per shard, the unit a rerun skips (default: {DEFAULT_SHARD_SIZE})",
    )
    parser.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=DEFAULT_MAX_TOKENS_PER_BATCH,
        metavar="N",
        help=f"tokens per forward pass; a longer document goes alone (default: {DEFAULT_MAX_TOKENS_PER_BATCH})",
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        metavar="N",
        help="cut documents at N tokens, [CLS] and [SEP] included (default: the fine-tune's max_seq_len, else "
        "the model's max_position_embeddings)",
    )
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer for text input (default: the training one)")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    parser.set_defaults(run=_cmd_encode)


def _cmd_eval_retrieval(args: argparse.Namespace) -> int:
    split = read_split(args.task, args.split)  # a bad task fails before the model is loaded
    if late_interaction_run_config(args.model) is not None:
        scorer, kind = late_interaction_scorer(args.model), "late interaction, MaxSim"
    else:
        scorer = dense_scorer(
            args.model, args.pooling, args.tokenizer, args.max_seq_len, args.max_tokens_per_batch, not args.no_progress
        )
        kind = f"{scorer.embedder.pooling} pooling"
    result = evaluate(scorer, split)
    print(
        f"{args.task} ({args.split}): {result.queries} queries, {result.documents} documents, "
        f"{result.seconds:.1f}s with {args.model} ({kind})"
    )
    print("  " + "  ".join(f"{name} {value:.4f}" for name, value in result.metrics.items()))
    if args.out:
        report = {
            "model": str(args.model),
            "scoring": kind,
            "task": str(args.task),
            "split": args.split,
            **asdict(result),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _configure_eval_retrieval(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Embed the queries and the corpus of a retrieval task's split with MODEL, rank the corpus "
        "for each query by cosine similarity (by MaxSim over token vectors when MODEL is a late-interaction "
        "fine-tune's checkpoint), and score the rankings against the split's qrels as BEIR does: "
        "nDCG@10, MRR@10 and recall@1, @10 and @100, averaged over the queries with a relevant document. "
        "The task (--task DIR) is a folder that flexbert prepare retrieval writes, or any folder holding "
        "SPLIT/queries.jsonl, SPLIT/corpus.jsonl and SPLIT/qrels.tsv in BEIR's formats."
    )
    parser.add_argument(
        "model", metavar="MODEL", help="a checkpoint of this project, or a Hugging Face ModernBERT directory"
    )
    parser.add_argument("--task", required=True, metavar="DIR", help="the retrieval task's folder")
    parser.add_argument(
        "--split", default="eval", metavar="SPLIT", help=f"the split to rank ({' or '.join(SPLITS)}; default: eval)"
    )
    add_pooling_argument(parser)
    parser.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=DEFAULT_MAX_TOKENS_PER_BATCH,
        metavar="N",
        help=f"tokens per forward pass; a longer text goes alone (default: {DEFAULT_MAX_TOKENS_PER_BATCH})",
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        metavar="N",
        help="cut texts at N tokens (default: the fine-tune's max_seq_len, else the model's max_position_embeddings)",
    )
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer to read texts with (default: the training one)")
    parser.add_argument("--out", metavar="FILE", help="also write the metrics, counts and settings here as JSON")
    parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    parser.set_defaults(run=_cmd_eval_retrieval)


PARSERS = {"encode": _configure_encode, "eval-retrieval": _configure_eval_retrieval}
