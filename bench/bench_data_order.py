"""The cost of the data-order record at the base recipe's batch size: bytes and time per step and rank,
the binary record (``flexbert.train.data_order``) beside the JSON lines that ``debug.log_sample_ids``
wrote before it.

    .venv/bin/python bench/bench_data_order.py [--recipe yamls/pretrain-base.yaml] [--gpus 8] [--steps 2000]

A step of one rank holds ``global_batch_rows / gpus`` rows of ``train_loader.max_seq_len`` tokens, as
the recipe says. Its pieces come from the real packer (``PackedMLMLoader``) over the demo corpus
(web, code, science; tokenized with the ModernBERT tokenizer), built and converted in a temporary
folder unless --mds names one. Both formats write the same steps (the packed batches, cycled) to files
in one temporary folder, interleaved step by step in alternating order; the time is one step's
write as the callback does it as the step ends (pack, checksum, write, flush; JSON: the row's dict,
``json.dumps``, write, flush), medians reported. Then the time ``flexbert data-order`` needs to find
one step in the record, and to read the whole record back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_loader import DEFAULT_TOKENIZER, prepare_demo_streams

from flexbert.core.tokenizer import load_tokenizer
from flexbert.data.loader import PackedMLMLoader
from flexbert.data.streams import LoaderConfig
from flexbert.train.data_order import DataOrderWriter, data_files, read_data_order, step_record
from flexbert.typed_config import from_dict
from flexbert.yaml_config import load_yaml_config

ROOT = Path(__file__).resolve().parents[1]
MASK_SEED = 1_234_567_890


def packed_steps(mds: Path, rows: int, seq_len: int, count: int) -> list[np.ndarray]:
    """The piece keys of ``count`` batches of ``rows`` rows, one rank's steps, from the real packer."""
    streams = {d.name: {"local": str(d)} for d in sorted(mds.iterdir()) if (d / "index.json").is_file()}
    config = from_dict(
        LoaderConfig,
        dict(tokenizer=str(DEFAULT_TOKENIZER), streams=streams, max_seq_len=seq_len, rows_per_batch=rows),
        "train_loader",
    )
    loader = PackedMLMLoader(config, load_tokenizer(DEFAULT_TOKENIZER))
    steps = []
    for batch in loader:
        steps.append(batch.piece_keys)
        if len(steps) == count:
            return steps
    raise SystemExit(f"the corpus gave only {len(steps)} batches of {rows} rows")


class JSONLines:
    """The record as ``debug.log_sample_ids`` wrote it: one JSON line per step, flushed."""

    def __init__(self, path: Path):
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def append(self, step: int, mask_seed: int, piece_keys: np.ndarray) -> None:
        self._file.write(json.dumps({"step": step, "pieces": piece_keys.tolist(), "mask_seed": mask_seed}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "yamls" / "pretrain-base.yaml")
    parser.add_argument("--gpus", type=int, default=8, help="ranks the global batch is shared by (the recipe's 8)")
    parser.add_argument("--steps", type=int, default=2000, help="steps written in each format")
    parser.add_argument("--batches", type=int, default=6, help="distinct packed batches, cycled over the steps")
    parser.add_argument("--mds", type=Path, help="folder with one MDS stream per sub-folder (default: demo corpus)")
    args = parser.parse_args()

    recipe = load_yaml_config(args.recipe, [])
    rows, seq_len = recipe["global_batch_rows"] // args.gpus, recipe["train_loader"]["max_seq_len"]
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        mds = args.mds or prepare_demo_streams(workdir / "demo", DEFAULT_TOKENIZER)
        steps = packed_steps(mds, rows, seq_len, args.batches)
        pieces = [len(keys) for keys in steps]
        print(
            f"{args.recipe.name}: {recipe['global_batch_rows']} rows over {args.gpus} ranks = {rows} rows of "
            f"{seq_len} tokens per rank and step; pieces per step (real packer, demo corpus): "
            f"{min(pieces)}-{max(pieces)}, mean {statistics.mean(pieces):,.0f}"
        )

        binary = DataOrderWriter(workdir / "record" / "data_order", 0)
        lines = JSONLines(workdir / "rank0.jsonl")
        times: dict[str, list[float]] = {"binary": [], "json": []}
        writers = {"binary": binary, "json": lines}
        for step in range(args.steps):
            keys = steps[step % len(steps)]
            order = ("binary", "json") if step % 2 == 0 else ("json", "binary")
            for name in order:
                started = time.perf_counter()
                writers[name].append(step, MASK_SEED, keys)
                times[name].append(time.perf_counter() - started)
        binary.close()
        lines.close()

        data, index = data_files(workdir / "record" / "data_order", 0)
        sizes = {"binary": data.stat().st_size + index.stat().st_size, "json": lines.path.stat().st_size}
        for name, label in (("binary", "binary record (.bin + .idx)"), ("json", "JSON lines (before)")):
            per_step = sizes[name] / args.steps
            print(
                f"{label:28s} {per_step:>9,.0f} bytes/step/rank ({per_step / statistics.mean(pieces):5.1f} per piece)  "
                f"write {1e6 * statistics.median(times[name]):>7,.1f} us/step (median; p90 "
                f"{1e6 * np.percentile(times[name], 90):,.1f} us)"
            )
        # The demo corpus numbers its few thousand documents in 4 digits; a pretraining corpus of
        # billions numbers them in 10, which only the JSON lines pay for.
        big = [keys + np.array([0, 10**9, 0, 0]) for keys in steps]
        big_json = statistics.mean(
            len(json.dumps({"step": 123_456, "pieces": keys.tolist(), "mask_seed": MASK_SEED}) + "\n") for keys in big
        )
        print(f"{'JSON lines, 10-digit samples':28s} {big_json:>9,.0f} bytes/step/rank (binary: unchanged)")
        ratio_bytes = sizes["json"] / sizes["binary"]
        ratio_time = statistics.median(times["json"]) / statistics.median(times["binary"])
        print(f"binary vs JSON: {ratio_bytes:.1f}x fewer bytes, {ratio_time:.1f}x less time per step")

        run_dir = workdir / "record"
        lookups = []
        for step in np.random.default_rng(0).integers(0, args.steps, 20):
            started = time.perf_counter()
            step_record(run_dir, int(step))
            lookups.append(time.perf_counter() - started)
        started = time.perf_counter()
        read_data_order(run_dir)
        whole = time.perf_counter() - started
        print(
            f"reading: one step found through the index {1e3 * statistics.median(lookups):.2f} ms (median of 20); "
            f"the whole {args.steps}-step record read and checked {whole:.2f} s"
        )


if __name__ == "__main__":
    main()
