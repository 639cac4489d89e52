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


class DocumentGrid:
    """The unpadded stream laid out one document per row: ``[docs, row_length, ...]``, with each
    document's tokens starting ``offset`` cells into its row and zeros in the cells no token fills.

    When the cells are exactly the tokens (every document full-length, no offset), moving in and
    out of the grid is a free reshape.
    """

    def __init__(self, layout: DocumentLayout, row_length: int, offset: int = 0):
        self.num_docs, self.row_length = layout.num_docs, row_length
        self.index = layout.doc_ids * row_length + offset + layout.positions  # [T] token -> cell
        self.dense = offset == 0 and self.num_docs * row_length == layout.num_tokens

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [docs, row_length, ...]"""
        if not self.dense:
            x = scatter_rows(x, self.index, self.num_docs * self.row_length)
        return x.view(self.num_docs, self.row_length, *x.shape[1:])

    def gather(self, grid: torch.Tensor) -> torch.Tensor:
        """[docs, row_length, ...] -> [T, ...]"""
        flat = grid.flatten(0, 1)
        return flat if self.dense else flat[self.index]


# A local layer attends block by block once documents are this many half-windows long (1024 tokens
# at ModernBERT's window). Each block's keys are copied out with their overlap, three times the
# keys and values to hold for the backward pass; at 512 tokens that memory costs a CPU more than
# the scores it saves (bench/bench_attention.py, bench/bench_model.py).
BANDED_MIN_HALF_WINDOWS = 16


# Documents shorter than this share one group: their grid is cheap whatever their lengths.
GROUP_MIN_LENGTH = 64
# Devices whose tensors the host reads without stalling anything: grouping by length happens there.
GROUPING_DEVICES = ("cpu",)


@ATTENTION_BACKENDS.register("sdpa")
def prepare_sdpa(layout: DocumentLayout, half_window: int | None, scale: float) -> Attend:
    """PyTorch SDPA on grids with one document per row, so no key crosses a document boundary.

    One grid sized for the longest document would spend most of its cells on padding when lengths
    vary, so documents are grouped by length (within a factor of two), each group a grid of its own.
    Grouping reads the lengths, so it happens only where they are on the host (a CPU batch); on a
    GPU that read would stall the device, and one grid serves. Local layers on long documents run
    banded: the cost then grows with length times window rather than with length squared (an
    8192-token document at ModernBERT's window: 43x fewer scores).
    """
    groups = _length_groups(layout)
    if len(groups) == 1:
        return _grid_sdpa(layout, half_window, scale)
    parts = [(tokens, _grid_sdpa(group, half_window, scale)) for tokens, group in groups]
    back_to_stream = torch.argsort(torch.cat([tokens for tokens, _ in parts]))

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        outs = [group_attend(q[tokens], k[tokens], v[tokens], dropout_p) for tokens, group_attend in parts]
        return torch.cat(outs)[back_to_stream]

    return attend


def _length_groups(layout: DocumentLayout) -> list[tuple[torch.Tensor | None, DocumentLayout]]:
    """(token indices into the stream, layout of just those documents) per group of documents whose
    lengths round up to the same power of two; one group, the whole stream, on a GPU."""
    if layout.cu_seqlens.device.type not in GROUPING_DEVICES:
        return [(None, layout)]
    lengths = _document_lengths(layout)
    group_of_doc = torch.log2(lengths.clamp(min=GROUP_MIN_LENGTH).double()).ceil().long()
    if bool((group_of_doc == group_of_doc[0]).all()):
        return [(None, layout)]
    groups = []
    for group in group_of_doc.unique().tolist():
        docs = (group_of_doc == group).nonzero().squeeze(1)
        doc_lengths = lengths[docs]
        cu_seqlens = F.pad(doc_lengths.cumsum(0), (1, 0))
        num_tokens = int(cu_seqlens[-1])
        # Token t of the group sits at stream position t + (its document's start in the stream
        # minus its start in the group).
        shift = layout.cu_seqlens.long()[docs] - cu_seqlens[:-1]
        tokens = torch.arange(num_tokens) + torch.repeat_interleave(shift, doc_lengths, output_size=num_tokens)
        groups.append((tokens, DocumentLayout.from_cu_seqlens(cu_seqlens, int(doc_lengths.max()), num_tokens)))
    return groups


def _grid_sdpa(layout: DocumentLayout, half_window: int | None, scale: float) -> Attend:
    if half_window is not None and layout.max_seqlen >= BANDED_MIN_HALF_WINDOWS * half_window:
        return _banded_sdpa(layout, half_window, scale)
    return _full_sdpa(layout, half_window, scale)


def _document_lengths(layout: DocumentLayout) -> torch.Tensor:
    return (layout.cu_seqlens[1:] - layout.cu_seqlens[:-1]).long()


def _full_sdpa(layout: DocumentLayout, half_window: int | None, scale: float) -> Attend:
    """Every query of a document scored against every key of it, with a mask where needed."""
    max_len = layout.max_seqlen
    device = layout.doc_ids.device
    grid = DocumentGrid(layout, max_len)
    mask = None
    if half_window is not None or not grid.dense:
        key_pos = torch.arange(max_len, device=device)
        allowed = (key_pos[None, :] < _document_lengths(layout)[:, None])[:, None, :]  # [docs, 1, keys]
        if half_window is not None:
            distance = (key_pos[:, None] - key_pos[None, :]).abs()
            allowed = allowed & (distance <= half_window)[None]  # [docs, queries, keys]
        # Padding queries attend to themselves so that no row is empty (an empty row is NaN,
        # and NaN survives into the backward pass even where the output is discarded).
        allowed = allowed | torch.eye(max_len, dtype=torch.bool, device=device)[None]
        mask = allowed[:, None]  # [docs, 1 (heads), queries, keys]

    def to_grid(x: torch.Tensor) -> torch.Tensor:  # [T, h, d] -> [docs, h, max_len, d]
        return grid.scatter(x).transpose(1, 2)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            to_grid(q), to_grid(k), to_grid(v), attn_mask=mask, dropout_p=dropout_p, scale=scale
        )
        return grid.gather(out.transpose(1, 2))

    return attend


def _banded_sdpa(layout: DocumentLayout, half_window: int, scale: float) -> Attend:
    """Sliding-window attention in blocks of ``half_window`` queries. A block's queries can only
    reach the keys from ``half_window`` before its first query to ``half_window`` after its last,
    so each block is scored against that span of 3·half_window keys alone.
    """
    device = layout.doc_ids.device
    block = half_window
    span = block + 2 * half_window
    num_blocks = -(-layout.max_seqlen // block)
    num_docs = layout.num_docs
    queries = DocumentGrid(layout, num_blocks * block)
    # Keys sit half_window cells in, so that block b's span is cells [b·block, b·block + span).
    keys = DocumentGrid(layout, num_blocks * block + 2 * half_window, offset=half_window)

    query_pos = torch.arange(num_blocks * block, device=device).view(num_blocks, 1, block, 1)
    key_pos = (torch.arange(num_blocks, device=device) * block - half_window).view(num_blocks, 1, 1, 1) + \
        torch.arange(span, device=device)  # [blocks, 1, 1, span]
    lengths = _document_lengths(layout).view(num_docs, 1, 1, 1, 1)
    allowed = ((key_pos - query_pos).abs() <= half_window) & (key_pos >= 0) & (key_pos < lengths)
    # As in the full grid, a padding query sees itself so that its row is never empty.
    mask = (allowed | (key_pos == query_pos)).flatten(0, 1)  # [docs * blocks, 1, block, span]

    def query_blocks(x: torch.Tensor) -> torch.Tensor:  # [T, h, d] -> [docs * blocks, h, block, d]
        grid = queries.scatter(x).unflatten(1, (num_blocks, block))  # [docs, blocks, block, h, d]
        return grid.transpose(2, 3).flatten(0, 1)

    def key_spans(x: torch.Tensor) -> torch.Tensor:  # [T, h, d] -> [docs * blocks, h, span, d]
        spans = keys.scatter(x).unfold(1, span, block)  # [docs, blocks, h, d, span]
        return spans.transpose(3, 4).flatten(0, 1)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            query_blocks(q), key_spans(k), key_spans(v), attn_mask=mask, dropout_p=dropout_p, scale=scale
        )  # [docs * blocks, h, block, d]
        out = out.unflatten(0, (num_docs, num_blocks)).transpose(2, 3).flatten(1, 2)  # [docs, cells, h, d]
        return queries.gather(out)

    return attend


_FLEX_BLOCK = 128


@ATTENTION_BACKENDS.register("flex")
def prepare_flex(layout: DocumentLayout, half_window: int | None, scale: float) -> Attend:
    """FlexAttention over the whole stream with a document (and sliding-window) block mask, built
    block by block (see :func:`document_block_mask`), never query by key."""
    from torch.nn.attention.flex_attention import flex_attention

    device = layout.doc_ids.device
    num_tokens = layout.num_tokens
    padded_len = -(-num_tokens // _FLEX_BLOCK) * _FLEX_BLOCK
    block_mask = document_block_mask(layout, half_window, padded_len)
    kernel = _compiled_flex_attention() if device.type == "cuda" else flex_attention

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        if dropout_p > 0:
            raise ValueError("FlexAttention cannot drop attention probabilities; use sdpa or flash")

        def to_stream(x: torch.Tensor) -> torch.Tensor:  # [T, h, d] -> [1, h, T_padded, d]
            return F.pad(x, (0, 0, 0, 0, 0, padded_len - num_tokens)).transpose(0, 1)[None]

        out = kernel(to_stream(q), to_stream(k), to_stream(v), block_mask=block_mask, scale=scale)
        return out[0].transpose(0, 1)[:num_tokens]

    return attend


def document_block_mask(layout: DocumentLayout, half_window: int | None, padded_len: int):
    """The block mask of "same document, and ``|i - j| <= half_window`` on local layers" over the
    stream padded to ``padded_len`` (its tail padding is one more document, so no row is empty).

    ``create_block_mask`` finds the blocks by evaluating the mask for every (query, key) pair, a
    tokens x tokens tensor (10^10 elements for a 96 x 1024 microbatch) unless it is compiled. Here
    the blocks follow from the document boundaries: the keys a query block can reach run from the
    start of its first token's document to the end of its last token's (and, on local layers, lie
    within the window of one of its queries). So each query block lists at most
    ``2 * max_seqlen / 128 + 3`` key blocks (``2 * half_window / 128 + 3`` on local layers): the cost
    grows with tokens times that reach, never with tokens squared, and no value is read on the host.
    The mask is symmetric, so the query blocks of each key block are the same lists.
    """
    from torch.nn.attention.flex_attention import BlockMask

    device = layout.doc_ids.device
    block = _FLEX_BLOCK
    num_tokens, num_blocks = layout.num_tokens, padded_len // block
    padding = padded_len - num_tokens
    bounds = layout.cu_seqlens.long()
    if padding:
        bounds = torch.cat([bounds, torch.full((1,), padded_len, dtype=torch.long, device=device)])
    doc_ids = F.pad(layout.doc_ids, (0, padding), value=-1)

    def same_document(b, h, q_idx, kv_idx):
        return doc_ids[q_idx] == doc_ids[kv_idx]

    def same_document_in_window(b, h, q_idx, kv_idx):
        return (doc_ids[q_idx] == doc_ids[kv_idx]) & ((q_idx - kv_idx).abs() <= half_window)

    first = torch.arange(num_blocks, device=device) * block  # [blocks] each block's first token
    last = first + block - 1
    first_doc = torch.searchsorted(bounds, first, right=True) - 1
    last_doc = torch.searchsorted(bounds, last, right=True) - 1
    reach_start, reach_end = bounds[first_doc], bounds[last_doc + 1]  # keys [start, end) in reach
    if half_window is not None:
        reach_start = torch.maximum(reach_start, first - half_window)
        reach_end = torch.minimum(reach_end, last + half_window + 1)
    lowest, highest = reach_start // block, (reach_end - 1) // block
    # Host arithmetic bounds the lists' width, so no list length is read back from the device: a
    # query block's reach spans at most its first and last documents and the block between them.
    longest = 2 * max(layout.max_seqlen, padding) + block if half_window is None else 2 * half_window + block
    width = min(num_blocks, -(-longest // block) + 2)
    candidates = lowest[:, None] + torch.arange(width, device=device)  # [blocks, width]
    listed = candidates <= highest[:, None]
    candidates = candidates.clamp(max=num_blocks - 1)
    # A full block needs no mask: both blocks inside one document, and every pair within the window.
    kv_first_doc, kv_last_doc = first_doc[candidates], last_doc[candidates]
    one_document = (first_doc == last_doc)[:, None] & (kv_first_doc == kv_last_doc) & (kv_first_doc == first_doc[:, None])
    full = listed & one_document
    if half_window is not None:
        full &= ((candidates - torch.arange(num_blocks, device=device)[:, None]).abs() + 1) * block - 1 <= half_window
    partial = listed & ~full

    def ordered(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(count, block indices with the chosen ones first, in order) as [1, 1, blocks(, width)]."""
        order = torch.argsort((~chosen).to(torch.int32), dim=1, stable=True)
        indices = candidates.gather(1, order).to(torch.int32)
        return chosen.sum(dim=1, dtype=torch.int32)[None, None], indices[None, None]

    (partial_count, partial_indices), (full_count, full_indices) = ordered(partial), ordered(full)
    mask_mod = same_document if half_window is None else same_document_in_window
    return BlockMask((padded_len, padded_len), partial_count, partial_indices, full_count, full_indices,
                     partial_count, partial_indices, full_count, full_indices, (block, block), mask_mod)


@functools.cache
def _compiled_flex_attention():
    """FlexAttention is only fast once compiled; eager mode materialises the full score matrix.

    Packed batches vary in token count, so shapes are left to automatic dynamic compilation: one
    recompile with a symbolic length, rather than a new graph for every length up to the
    recompile limit."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


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


@ATTENTION_BACKENDS.register("flash3")
def prepare_flash3(layout: DocumentLayout, half_window: int | None, scale: float) -> Attend:
    """FlashAttention-3's varlen kernel (Hopper), global and sliding-window alike; 16-bit only, so
    fp32 inputs are computed in bf16. It has no dropout."""
    if not flash3_available():
        raise RuntimeError("attn_backend 'flash3' needs FlashAttention-3 (flash_attn_interface)")
    from flash_attn_interface import flash_attn_varlen_func

    window = (-1, -1) if half_window is None else (half_window, half_window)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        if dropout_p > 0:
            raise ValueError("FlashAttention-3 cannot drop attention probabilities; use sdpa or flash")
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        out = flash_attn_varlen_func(
            q.to(dtype), k.to(dtype), v.to(dtype), layout.cu_seqlens, layout.cu_seqlens,
            layout.max_seqlen, layout.max_seqlen, softmax_scale=scale, causal=False, window_size=window,
        )
        out = out[0] if isinstance(out, tuple) else out  # some releases also return the log-sum-exp
        return out.to(q.dtype)

    return attend
