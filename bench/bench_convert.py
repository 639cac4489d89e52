"""convert_to_mds throughput against the bare tokenizer on the same text with the same cores.

    python bench/bench_convert.py [PATH ...] [--tokenizer DIR] [--workers N] [--megabytes MB]

Without PATH, the corpus is the Python standard library's sources (one JSON line per file, up to
--megabytes). The bare figure is one ``tokenizers`` encode_batch call over every document already in
memory, on ``--workers`` threads: the ceiling for a converter that must also read, write and
compress. convert_to_mds runs twice: cold (imports and worker start-up included, as a one-off
command pays them) and warm (as a long job pays them: almost not at all). The goal is warm/bare >= 0.7.
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import tempfile
import time
from pathlib import Path

MODERNBERT_TOKENIZER = Path(__file__).resolve().parents[1] / "tokenizers" / "modernbert"


def stdlib_corpus(path: Path, megabytes: float) -> Path:
    """Write the standard library's sources, in sorted order, as JSON lines until ``megabytes``."""
    budget = megabytes * 1e6
    with path.open("w") as out:
        for source in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            if budget <= 0:
                break
            text = source.read_text(encoding="utf-8", errors="replace")
            out.write(json.dumps({"text": text}) + "\n")
            budget -= len(text.encode())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="PATH", help="corpus files or folders (default: stdlib sources)")
    parser.add_argument(
        "--tokenizer", default=str(MODERNBERT_TOKENIZER), help="tokenizer folder (default: ModernBERT's)"
    )
    parser.add_argument("--workers", type=int, default=None, help="cores for both sides (default: all)")
    parser.add_argument("--megabytes", type=float, default=8.0, help="size of the default corpus (default: 8)")
    parser.add_argument("--unit-size", default=None, help="convert_to_mds --unit-size (default: its default)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--repeats", type=int, default=3, help="warm runs of each side; the best counts (default: 3)")
    args = parser.parse_args()

    from flexbert.data.convert import DEFAULT_UNIT_SIZE, available_cores, convert_to_mds

    workers = args.workers or available_cores()
    # Before the tokenizer's thread pool starts: the bare side gets the same cores as the converter.
    os.environ.update(TOKENIZERS_PARALLELISM="true" if workers > 1 else "false", RAYON_NUM_THREADS=str(workers))
    from flexbert.core.sources import iter_documents
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        inputs = args.inputs or [str(stdlib_corpus(Path(scratch) / "stdlib.jsonl", args.megabytes))]
        texts = list(iter_documents(inputs, args.text_field))
        megabytes = sum(len(text.encode()) for text in texts) / 1e6
        print(f"corpus: {len(texts):,} documents, {megabytes:.1f} MB ({', '.join(inputs)}); {workers} workers")
        tokenizer = Tokenizer.from_file(str(Path(args.tokenizer) / "tokenizer.json"))
        tokens = sum(len(encoding.ids) for encoding in tokenizer.encode_batch(texts, add_special_tokens=False))

        def bare() -> float:
            started = time.perf_counter()
            tokenizer.encode_batch(texts, add_special_tokens=False)
            return time.perf_counter() - started

        def convert() -> float:
            started = time.perf_counter()
            summary = convert_to_mds(
                inputs,
                Path(scratch) / "mds",
                args.tokenizer,
                text_field=args.text_field,
                workers=workers,
                overwrite=True,
                unit_size=args.unit_size or DEFAULT_UNIT_SIZE,
                progress=False,
            )
            assert summary.total.tokens == tokens, "convert_to_mds and the tokenizer disagree on the token count"
            return time.perf_counter() - started

        cold = convert()
        # Interleaved, so that a busy moment on the machine does not favour one side.
        bare_seconds, warm_seconds = zip(*[(bare(), convert()) for _ in range(args.repeats)])
        rate = {
            name: tokens / seconds
            for name, seconds in (("bare", min(bare_seconds)), ("cold", cold), ("warm", min(warm_seconds)))
        }
        print(f"tokens: {tokens:,}")
        print(f"bare tokenizers encode_batch: {rate['bare']:,.0f} tokens/s (best of {args.repeats})")
        print(
            f"convert_to_mds, cold (imports and worker start-up included): {rate['cold']:,.0f} tokens/s, "
            f"{rate['cold'] / rate['bare']:.2f} x bare"
        )
        print(
            f"convert_to_mds, warm: {rate['warm']:,.0f} tokens/s (best of {args.repeats}), "
            f"{rate['warm'] / rate['bare']:.2f} x bare"
        )


if __name__ == "__main__":
    main()
