"""``flexbert data-order RUN --step N`` (``pip install 'flexbert[train]'``): the documents one step of
a pretraining run trained on, read from the run's record (``train/data_order.py``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flexbert.core.checkpoint import RunDir
from flexbert.core.tokenizer import load_tokenizer
from flexbert.errors import FlexBertError, MissingFileError, RunFolderError
from flexbert.train.data_order import Record, StreamLayout, step_record
from flexbert.train.loggers import read_step_lines

COLUMNS = ("rank", "stream", "shard", "sample", "in shard", "dataset index", "tokens")
NUMERIC = {"sample", "in shard", "dataset index"}  # right-aligned; rank stays left, so text lines (indented) stand out


def _cmd_data_order(args: argparse.Namespace) -> int:
    run = RunDir(Path(args.run_dir))
    if not run.path.is_dir():
        raise MissingFileError(f"run folder not found: {run.path}")
    config = run.read_config() or {}
    streams = (config.get("train_loader") or {}).get("streams")
    if not streams:
        raise RunFolderError(f"{run.config_file}: missing, or not a pretraining run's (no train_loader.streams)")
    records = step_record(run.path, args.step)
    if args.rank is not None:
        if args.rank not in records:
            raise RunFolderError(
                f"rank {args.rank} has no record of step {args.step} in {run.path}; ranks {sorted(records)} have"
            )
        records = {args.rank: records[args.rank]}

    layout = StreamLayout(streams)
    notes = [f"shards of stream {layout.names[n]!r} unknown: {problem}" for n, problem in layout.problems.items()]
    texts, problem = _texts(records, layout, config["train_loader"].get("tokenizer")) if args.text else ({}, None)
    if problem is not None:
        notes.append(f"cannot show the text: {problem}")

    pieces = sum(len(record.pieces) for record in records.values())
    seeds = sorted({record.mask_seed for record in records.values()})
    seed = (
        f"mask seed {seeds[0]}"
        if len(seeds) == 1
        else "mask seeds " + ", ".join(f"rank {rank} {record.mask_seed}" for rank, record in records.items())
    )
    rate = _mask_rate(run, args.step)
    if rate is not None:
        seed += f", mask rate {rate}"
    ranks = f"{len(records)} rank{'s' if len(records) != 1 else ''}"
    print(f"{run.path}, step {args.step}: {pieces} pieces on {ranks}, {seed}")
    print("streams: " + ", ".join(f"{name} = {location}" for name, location in zip(layout.names, layout.locations)))
    rows = [
        (rank, index, _row(rank, piece, layout))
        for rank, record in records.items()
        for index, piece in enumerate(record.pieces)
    ]
    widths = [max(len(column), *(len(row[i]) for _, _, row in rows)) for i, column in enumerate(COLUMNS)]
    print(_line(COLUMNS, widths))
    for rank, index, row in rows:
        print(_line(row, widths))
        if (rank, index) in texts:
            print("\n".join("    " + line for line in texts[rank, index].splitlines() or [""]))
    for note in notes:
        print(f"flexbert: note: {note}", file=sys.stderr)
    return 1 if problem is not None else 0


def _mask_rate(run: RunDir, step: int) -> float | None:
    """The rate the step's batch was masked at (which a schedule moves from step to step), as
    metrics.jsonl logged it; None where it did not."""
    if not run.metrics_file.is_file():
        return None
    return next((row.get("batch/mask_rate") for row in read_step_lines(run.metrics_file) if row["step"] == step), None)


def _row(rank: int, piece, layout: StreamLayout) -> tuple[str, ...]:
    stream, sample = int(piece["stream"]), int(piece["sample"])
    located = layout.locate(stream, sample)
    shard, in_stream, in_shard = located if located is not None else ("?", "?", "?")
    name = layout.names[stream] if stream < len(layout.names) else f"#{stream}"
    return (str(rank), name, shard, str(in_stream), str(in_shard), str(sample), f"{piece['start']}:{piece['end']}")


def _line(cells, widths) -> str:
    return "  ".join(
        cell.rjust(width) if column in NUMERIC else cell.ljust(width)
        for cell, width, column in zip(cells, widths, COLUMNS)
    ).rstrip()


def _texts(records: dict[int, Record], layout: StreamLayout, tokenizer_dir: str | None):
    """The decoded text of each piece by (rank, its position), or the one reason there is none."""
    texts = {}
    try:
        if tokenizer_dir is None:
            raise RunFolderError("the run's config.json names no train_loader.tokenizer")
        tokenizer = load_tokenizer(tokenizer_dir).tokenizer
        for rank, record in records.items():
            for index, piece in enumerate(record.pieces):
                tokens = layout.tokens(int(piece["stream"]), int(piece["sample"]))[piece["start"] : piece["end"]]
                texts[rank, index] = tokenizer.decode(tokens.tolist(), skip_special_tokens=False)
    except FlexBertError as err:
        return {}, str(err)
    return texts, None


def _configure_data_order(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Print the documents that one optimizer step of a pretraining run trained on, from the record "
        "every run keeps in RUN/data_order/ (data_order.record, on by default): for each rank, each piece "
        "in batch order with its stream, its shard file (found from the stream's MDS index.json), its sample "
        "index in the stream and in the shard, its index in the run's streaming dataset, its token range "
        "start:end, and the step's mask seed and mask rate (the rate as RUN/metrics.jsonl logged it). Steps "
        "count from 0, as in metrics.jsonl; after a resumption, the steps the run trained again are shown as "
        "they were last trained. A step the run did not record "
        "(beyond its end, or trained with data_order: {record: false}) stops with one line."
    )
    parser.add_argument("run_dir", metavar="RUN", help="a pretraining run's folder, e.g. runs/demo/demo-pretrain")
    parser.add_argument("--step", type=int, required=True, metavar="N", help="the step to show (from 0)")
    parser.add_argument("--rank", type=int, metavar="R", help="only this rank's pieces")
    parser.add_argument(
        "--text",
        action="store_true",
        help="also print each piece's text, read from the run's MDS data with its tokenizer "
        "(remote shards are fetched; exit status 1 with a note if the data is gone)",
    )
    parser.set_defaults(run=_cmd_data_order)


PARSERS = {"data-order": _configure_data_order}
