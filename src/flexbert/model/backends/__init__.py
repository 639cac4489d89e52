"""Attention kernels over the unpadded token stream, behind one interface.

The encoder never sees padding. A batch is a flat stream of T real tokens holding one or more
documents back to back; a :class:`DocumentLayout` says where each one starts. A backend's
``prepare(layout, half_window, scale)`` runs once per batch and layer type, building whatever mask
or index its kernel needs, and returns ``attend(q, k, v, dropout_p)``, which every layer of that
type then calls. ``q, k, v`` and the result are ``[T, heads, head_dim]``.

Semantics shared by all backends, and spelled out by the ``eager`` one: query token i attends to
key j iff both lie in the same document and, for local layers, ``|i - j| <= half_window``.

One module per kernel: eager (the definition), sdpa, flex, flash (flash-attn 2), flash3.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flexbert.model.registries import ATTENTION_BACKENDS

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

# Devices whose tensors the host reads without stalling anything: sdpa groups documents by length
# only there.
GROUPING_DEVICES = ("cpu",)


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


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` means the fastest kernel that can run here: FlashAttention-3 on Hopper (compute
    capability 9) where it is installed, then flash-attn 2, then FlexAttention on other GPUs, and
    SDPA elsewhere."""
    if name != "auto":
        return name
    if device.type == "cuda":
        if flash3_available() and torch.cuda.get_device_capability(device)[0] == 9:
            return "flash3"
        return "flash" if flash_attn_available() else "flex"
    return "sdpa"


# The kernels register themselves; they import the names above, so they come last.
from flexbert.model.backends import eager, flash, flash3, flex, sdpa  # noqa: E402, F401

__all__ = [
    "ATTENTION_BACKENDS",
    "Attend",
    "DocumentLayout",
    "GROUPING_DEVICES",
    "flash3_available",
    "flash_attn_available",
    "resolve_backend",
    "scatter_rows",
]
