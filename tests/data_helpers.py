"""Tiny tokenized MDS streams for loader tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from streaming import MDSWriter


def write_stream(root: Path, name: str, lengths, vocab: int = 50000, seed: int = 0, dtype=np.uint16) -> Path:
    """An MDS stream of documents with the given lengths; document i's tokens derive from (seed, i)."""
    out = root / name
    column = "ndarray:uint16" if dtype == np.uint16 else "ndarray:uint32"
    with MDSWriter(out=str(out), columns={"input_ids": column}, compression="zstd", size_limit=1 << 16) as writer:
        for i, length in enumerate(lengths):
            writer.write({"input_ids": document_tokens(seed, i, length, vocab).astype(dtype)})
    return out


def document_tokens(seed: int, index: int, length: int, vocab: int = 50000) -> np.ndarray:
    return np.random.default_rng([seed, index]).integers(0, vocab, length)


def random_lengths(count: int, seed: int, low: int = 5, high: int = 700) -> list[int]:
    return [int(n) for n in np.random.default_rng(seed).integers(low, high, count)]
