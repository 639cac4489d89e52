"""Preparing FlexAttention's masks for one microbatch: our block-by-block construction against
``create_block_mask`` (eager, as the flex backend used it before), time and peak memory.

    .venv/bin/python bench/bench_flex_mask.py [--device cpu|cuda]

Microbatches of packed rows (documents of random lengths filling each row), at the recipes' sizes
(96 x 1024 tokens in phase 1, 12 x 8192 in context extension) and at smaller ones where the eager
``create_block_mask`` still fits in memory. Both the global mask and the local (window 128) one are
built. Each case runs in a fresh process, so its peak resident memory is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

CASES = [(8, 1024), (24, 1024), (96, 1024), (1, 8192), (12, 8192)]
# The eager create_block_mask builds tokens x tokens tensors: beyond this it would need tens of GB.
EAGER_MAX_TOKENS = 24 * 1024


def packed_lengths(rows: int, row_tokens: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    for _ in range(rows):
        room = row_tokens
        while room:
            lengths.append(min(room, int(torch.randint(1, row_tokens + 1, (1,), generator=gen))))
            room -= lengths[-1]
    return lengths


def measure(method: str, rows: int, row_tokens: int, device: str) -> dict:
    """Run in its own process: build both masks once to warm up, then time a second build."""
    from torch.nn.attention.flex_attention import create_block_mask

    from flexbert.core.model import DocumentLayout
    from flexbert.core.model.backends.flex import _FLEX_BLOCK, document_block_mask

    lengths = packed_lengths(rows, row_tokens)
    total = rows * row_tokens
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    layout = DocumentLayout.from_cu_seqlens(cu, max(lengths), total)
    padded = -(-total // _FLEX_BLOCK) * _FLEX_BLOCK

    def build() -> None:
        for half_window in (None, 64):
            if method == "ours":
                document_block_mask(layout, half_window, padded)
                continue
            doc_ids = layout.doc_ids

            def mask(b, h, q, kv, hw=half_window):
                same = doc_ids[q] == doc_ids[kv]  # noqa: B023 (used at once, within this iteration)
                return same if hw is None else same & ((q - kv).abs() <= hw)

            create_block_mask(mask, None, None, total, total, device=device)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    build()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    build()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    )
    return {"method": method, "rows": rows, "row_tokens": row_tokens, "seconds": seconds, "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "ROWS", "ROW_TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, rows, row_tokens = args.one
        print(json.dumps(measure(method, int(rows), int(row_tokens), args.device)))
        return
    peak = "peak GPU memory" if args.device == "cuda" else "peak RSS growth"
    print(f"FlexAttention mask preparation, global + local (window 128) masks, {args.device}; {peak}")
    for rows, row_tokens in CASES:
        line = f"  {rows:>3} x {row_tokens:>5} = {rows * row_tokens:>6} tokens:"
        for method in ("ours", "create_block_mask"):
            if method != "ours" and rows * row_tokens > EAGER_MAX_TOKENS:
                line += f"  {method} not run (tokens x tokens would need {(rows * row_tokens) ** 2 * 17 / 1e9:.0f} GB)"
                continue
            done = subprocess.run(
                [sys.executable, __file__, "--device", args.device, "--one", method, str(rows), str(row_tokens)],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(done.stdout)
            line += f"  {method} {result['seconds'] * 1e3:9.1f} ms {result['peak_bytes'] / 2**20:8.1f} MiB"
        print(line, flush=True)


if __name__ == "__main__":
    main()
