"""The packed layout that every attention kernel reads: documents back to back in one stream of T
tokens, with no padding, and the call each kernel returns. Which optional kernels are installed is
answered here too, so that the config can refuse one that is missing without importing it."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class DocumentLayout:
    cu_seqlens: torch.Tensor  # [n_docs + 1] int32, document d spans [cu[d], cu[d+1])
    max_seqlen: int  # longest document, a host int so kernels can size buffers without a sync
    doc_ids: torch.Tensor  # [T] int64, the document of each token
    positions: torch.Tensor  # [T] int64, position inside its document, restarting at 0

    @property
    def num_tokens(self) -> int:
        return self.doc_ids.shape[0]

    @property
    def num_docs(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, max_seqlen: int | None, num_tokens: int) -> DocumentLayout:
        cu_seqlens = cu_seqlens.to(torch.int32)
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if max_seqlen is None:
            max_seqlen = int(lengths.max())
        doc_ids = torch.repeat_interleave(
            torch.arange(lengths.shape[0], device=cu_seqlens.device), lengths, output_size=num_tokens
        )
        positions = torch.arange(num_tokens, device=cu_seqlens.device) - cu_seqlens.long()[doc_ids]
        return cls(cu_seqlens, int(max_seqlen), doc_ids, positions)

    def lengths(self) -> torch.Tensor:
        """[docs] int64"""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()


def scatter_rows(rows: torch.Tensor, indices: torch.Tensor, num_rows: int, fill: float = 0.0) -> torch.Tensor:
    """Place ``rows[i]`` at row ``indices[i]`` of a new ``[num_rows, ...]`` tensor (differentiable)."""
    out = rows.new_full((num_rows, *rows.shape[1:]), fill)
    return out.index_put((indices,), rows)


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def flash3_available() -> bool:
    """Whether FlashAttention-3 (``flash_attn_interface``, Hopper GPUs) is installed."""
    return importlib.util.find_spec("flash_attn_interface") is not None
