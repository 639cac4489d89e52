"""Loader throughput: packed, masked, unpadded batches per second from MDS streams.

    .venv/bin/python bench/bench_loader.py [--mds DIR] [--seq-len 1024] [--workers 0]

Without --mds it builds the embedded demo corpus and converts it (web, code, science streams) in a
temporary directory first. Prints tokens/s, rows, packing efficiency and the masked fraction.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from flexbert.core.model.losses import IGNORE_INDEX
from flexbert.core.tokenizer import load_tokenizer
from flexbert.data.convert import convert_to_mds
from flexbert.data.demo_corpus import build_demo_corpus
from flexbert.data.loader import PackedMLMLoader
from flexbert.data.streams import LoaderConfig
from flexbert.typed_config import from_dict

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[1] / "tokenizers" / "modernbert"
SOURCES = ("web", "code", "science")


def prepare_demo_streams(workdir: Path, tokenizer: Path) -> Path:
    build_demo_corpus(workdir / "corpus", progress=False)
    for source in SOURCES:
        convert_to_mds([workdir / "corpus" / source], workdir / "mds" / source, tokenizer, progress=False)
    return workdir / "mds"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mds", type=Path, help="folder with one MDS stream per sub-folder (default: demo corpus)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per packed row")
    parser.add_argument("--rows", type=int, default=16, help="rows per batch")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers reading documents")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        mds = args.mds or prepare_demo_streams(Path(workdir), args.tokenizer)
        streams = {d.name: {"local": str(d)} for d in sorted(mds.iterdir()) if (d / "index.json").is_file()}
        config = from_dict(
            LoaderConfig,
            dict(
                tokenizer=str(args.tokenizer),
                streams=streams,
                max_seq_len=args.seq_len,
                rows_per_batch=args.rows,
                num_workers=args.workers,
                epochs=1,
            ),
            "train_loader",
        )
        loader = PackedMLMLoader(config, load_tokenizer(args.tokenizer))
        tokens = masked = batches = 0
        started = time.perf_counter()
        for batch in loader:
            batches += 1
            tokens += batch.num_tokens
            masked += int((batch.labels != IGNORE_INDEX).sum())
        elapsed = time.perf_counter() - started
    print(
        f"loader: {tokens / elapsed:,.0f} tokens/s ({tokens:,} tokens, {batches} batches of {args.rows} rows "
        f"x {args.seq_len}, {elapsed:.2f} s, workers={args.workers})"
    )
    print(f"packing efficiency {loader.packing_efficiency:.4f}, masked fraction {masked / tokens:.3f}")


if __name__ == "__main__":
    main()
