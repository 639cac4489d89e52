"""Local (sliding-window) attention in the sdpa backend: banded blocks vs the full masked grid.

    .venv/bin/python bench/bench_attention.py [--device cpu|cuda] [--dtype fp32|bf16]

Forward+backward of one local layer's attention (12 heads of 64, window 128) over documents of
512, 1024 and 8192 tokens (8192 tokens per batch), both variants interleaved in one process.
"""

from __future__ import annotations

import argparse

import torch
from bench_model import DTYPES, side_by_side

from flexbert.core.model import DocumentLayout
from flexbert.core.model.backends.sdpa import _banded_sdpa, _full_sdpa

HEADS, HEAD_DIM, HALF_WINDOW = 12, 64, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"sdpa local attention, {HEADS} heads x {HEAD_DIM}, |i - j| <= {HALF_WINDOW}, {args.device} {args.dtype}")
    for doc_len in (512, 1024, 8192):
        docs = 8192 // doc_len
        cu_seqlens = torch.arange(0, 8193, doc_len, dtype=torch.int32, device=device)
        layout = DocumentLayout.from_cu_seqlens(cu_seqlens, doc_len, 8192)
        q, k, v = (torch.randn(8192, HEADS, HEAD_DIM, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

        def step(prepare, layout=layout, q=q, k=k, v=v):
            attend = prepare(layout, HALF_WINDOW, HEAD_DIM**-0.5)
            return lambda: attend(q, k, v, 0.0).sum().backward()

        seconds = side_by_side({"full": step(_full_sdpa), "banded": step(_banded_sdpa)}, device, args.repeats, warmup=1)
        print(
            f"  {docs} x {doc_len:>5} tokens: full grid {seconds['full'] * 1e3:8.1f} ms, "
            f"banded {seconds['banded'] * 1e3:7.1f} ms: {seconds['full'] / seconds['banded']:5.2f}x"
        )


if __name__ == "__main__":
    main()
