"""Attention kernels over the unpadded token stream, behind one interface.

A backend's ``prepare(layout, half_window, scale)`` runs once per batch and window type, building
whatever mask or index the kernel needs, and returns ``attend(q, k, v, dropout_p)`` which every
layer of that type then calls. ``q, k, v`` and the result are ``[T, heads, head_dim]``.

Semantics shared by all backends: query token i attends to key j iff both lie in the same
document and, for local layers, ``|i - j| <= half_window``.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

from flexbert.model.layout import DocumentLayout, scatter_rows
from flexbert.model.registries import ATTENTION_BACKENDS

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` means the fastest kernel that can run here."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "flash" if flash_attn_available() else "flex"
    return "sdpa"


@ATTENTION_BACKENDS.register("sdpa")
def prepare_sdpa(layout: DocumentLayout, half_window: int | None, scale: float) -> Attend:
    """PyTorch SDPA on a [docs, max_seqlen] grid: one row per document, so no cross-document keys."""
    num_docs, max_len = layout.num_docs, layout.max_seqlen
    device = layout.doc_ids.device
    grid_index = layout.doc_ids * max_len + layout.positions  # [T] token -> cell of the grid
    all_docs_full = num_docs * max_len == layout.num_tokens
    mask = None
    if half_window is not None or not all_docs_full:
        lengths = (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).long()
        key_pos = torch.arange(max_len, device=device)
        allowed = (key_pos[None, :] < lengths[:, None])[:, None, :]  # [docs, 1, keys]
        if half_window is not None:
            distance = (key_pos[:, None] - key_pos[None, :]).abs()
            allowed = allowed & (distance <= half_window)[None]  # [docs, queries, keys]
        # Padding queries attend to themselves so that no row is empty (an empty row is NaN,
        # and NaN survives into the backward pass even where the output is discarded).
        allowed = allowed | torch.eye(max_len, dtype=torch.bool, device=device)[None]
        mask = allowed[:, None]  # [docs, 1 (heads), queries, keys]

    def to_grid(x: torch.Tensor) -> torch.Tensor:  # [T, h, d] -> [docs, h, max_len, d]
        grid = scatter_rows(x, grid_index, num_docs * max_len)
        return grid.view(num_docs, max_len, *x.shape[1:]).transpose(1, 2)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            to_grid(q), to_grid(k), to_grid(v), attn_mask=mask, dropout_p=dropout_p, scale=scale
        )
        return out.transpose(1, 2).flatten(0, 1)[grid_index]

    return attend


_FLEX_BLOCK = 128


@ATTENTION_BACKENDS.register("flex")
def prepare_flex(layout: DocumentLayout, half_window: int | None, scale: float) -> Attend:
    """FlexAttention over the whole stream with a document (and sliding-window) block mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    device = layout.doc_ids.device
    num_tokens = layout.num_tokens
    padded_len = -(-num_tokens // _FLEX_BLOCK) * _FLEX_BLOCK
    # Tail padding forms its own pseudo-document, so its rows are never empty.
    doc_ids = F.pad(layout.doc_ids, (0, padded_len - num_tokens), value=-1)

    def same_document(b, h, q_idx, kv_idx):
        return doc_ids[q_idx] == doc_ids[kv_idx]

    def same_document_in_window(b, h, q_idx, kv_idx):
        return (doc_ids[q_idx] == doc_ids[kv_idx]) & ((q_idx - kv_idx).abs() <= half_window)

    mask_mod = same_document if half_window is None else same_document_in_window
    block_mask = create_block_mask(mask_mod, None, None, padded_len, padded_len, device=device)
    kernel = _compiled_flex_attention() if device.type == "cuda" else flex_attention

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        if dropout_p > 0:
            raise ValueError("FlexAttention cannot drop attention probabilities; use sdpa or flash")

        def to_stream(x: torch.Tensor) -> torch.Tensor:  # [T, h, d] -> [1, h, T_padded, d]
            return F.pad(x, (0, 0, 0, 0, 0, padded_len - num_tokens)).transpose(0, 1)[None]

        out = kernel(to_stream(q), to_stream(k), to_stream(v), block_mask=block_mask, scale=scale)
        return out[0].transpose(0, 1)[:num_tokens]

    return attend


@functools.cache
def _compiled_flex_attention():
    """FlexAttention is only fast once compiled; eager mode materialises the full score matrix."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@ATTENTION_BACKENDS.register("flash")
def prepare_flash(layout: DocumentLayout, half_window: int | None, scale: float) -> Attend:
    """flash-attn 2 varlen kernel; computes in bf16 when given fp32 (it supports only 16-bit)."""
    if not flash_attn_available():
        raise RuntimeError("attn_backend 'flash' needs the flash-attn package (flexbert[gpu])")
    from flash_attn import flash_attn_varlen_func

    window = (-1, -1) if half_window is None else (half_window, half_window)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        out = flash_attn_varlen_func(
            q.to(dtype), k.to(dtype), v.to(dtype),
            layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen, layout.max_seqlen,
            dropout_p=dropout_p, softmax_scale=scale, causal=False, window_size=window,
        )
        return out.to(q.dtype)

    return attend
