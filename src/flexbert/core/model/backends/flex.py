"""FlexAttention over the whole stream, with a block mask built from the document boundaries.

Compiled on CUDA, where it skips every block the mask leaves out; eager elsewhere (and then it
scores every pair). It has no dropout. On a CPU, torch 2.11 and later run its forward only (see
:func:`backward_runs_on_cpu`): there it serves inference, and training takes sdpa.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from flexbert.core.model.layout import Attend, DocumentLayout
from flexbert.core.model.registries import ATTENTION_BACKENDS

_FLEX_BLOCK = 128


@ATTENTION_BACKENDS.register("flex")
def prepare_flex(layout: DocumentLayout, half_window: int | None, scale: float, causal: bool = False) -> Attend:
    """FlexAttention over the whole stream with a document (sliding-window, causal) block mask,
    built block by block (see :func:`document_block_mask`), never query by key."""
    device = layout.doc_ids.device
    num_tokens = layout.num_tokens
    padded_len = -(-num_tokens // _FLEX_BLOCK) * _FLEX_BLOCK
    block_mask = document_block_mask(layout, half_window, padded_len, causal)
    kernel = _compiled_flex_attention() if device.type == "cuda" else flex_attention

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        if dropout_p > 0:
            raise ValueError("FlexAttention cannot drop attention probabilities; use sdpa or flash")

        def to_stream(x: torch.Tensor) -> torch.Tensor:  # [T, h, d] -> [1, h, T_padded, d]
            return F.pad(x, (0, 0, 0, 0, 0, padded_len - num_tokens)).transpose(0, 1)[None]

        out = kernel(to_stream(q), to_stream(k), to_stream(v), block_mask=block_mask, scale=scale)
        return out[0].transpose(0, 1)[:num_tokens]

    return attend


def document_block_mask(layout: DocumentLayout, half_window: int | None, padded_len: int, causal: bool = False):
    """The block mask of "same document, and ``|i - j| <= half_window`` on local layers, and
    ``j <= i`` when causal" over the stream padded to ``padded_len`` (its tail padding is one more
    document, so no row is empty).

    ``create_block_mask`` finds the blocks by evaluating the mask for every (query, key) pair, a
    tokens x tokens tensor (10^10 elements for a 96 x 1024 microbatch) unless it is compiled. Here
    the blocks follow from the document boundaries: the keys a query block can reach run from the
    start of its first token's document to the end of its last token's (and, on local layers, lie
    within the window of one of its queries). So each query block lists at most
    ``2 * max_seqlen / 128 + 3`` key blocks (``2 * half_window / 128 + 3`` on local layers): the cost
    grows with tokens times that reach, never with tokens squared, and no value is read on the host.
    Without ``causal`` the mask is symmetric, so the query blocks of each key block are the same
    lists; a causal mask is the lower triangle, whose key blocks of a query block reach no further
    than that block, and whose query blocks of a key block start at it.
    """
    device = layout.doc_ids.device
    block = _FLEX_BLOCK
    num_tokens, num_blocks = layout.num_tokens, padded_len // block
    padding = padded_len - num_tokens
    bounds = layout.cu_seqlens.long()
    if padding:
        bounds = torch.cat([bounds, torch.full((1,), padded_len, dtype=torch.long, device=device)])
    doc_ids = F.pad(layout.doc_ids, (0, padding), value=-1)

    def allowed(b, h, q_idx, kv_idx):
        same = doc_ids[q_idx] == doc_ids[kv_idx]
        if half_window is not None:
            same = same & ((q_idx - kv_idx).abs() <= half_window)
        if causal:
            same = same & (kv_idx <= q_idx)
        return same

    first = torch.arange(num_blocks, device=device) * block  # [blocks] each block's first token
    last = first + block - 1
    first_doc = torch.searchsorted(bounds, first, right=True) - 1
    last_doc = torch.searchsorted(bounds, last, right=True) - 1
    reach_start, reach_end = bounds[first_doc], bounds[last_doc + 1]  # keys [start, end) in reach
    if half_window is not None:
        reach_start = torch.maximum(reach_start, first - half_window)
        reach_end = torch.minimum(reach_end, last + half_window + 1)
    if causal:
        reach_end = torch.minimum(reach_end, last + 1)
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
    one_document = (
        (first_doc == last_doc)[:, None] & (kv_first_doc == kv_last_doc) & (kv_first_doc == first_doc[:, None])
    )
    full = listed & one_document
    query_block = torch.arange(num_blocks, device=device)[:, None]
    if half_window is not None:
        full &= ((candidates - query_block).abs() + 1) * block - 1 <= half_window
    if causal:  # every key of an earlier block precedes every query; the diagonal block is partial
        full &= candidates < query_block
    partial = listed & ~full

    def ordered(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(count, block indices with the chosen ones first, in order) as [1, 1, blocks(, width)]."""
        order = torch.argsort((~chosen).to(torch.int32), dim=1, stable=True)
        indices = candidates.gather(1, order).to(torch.int32)
        return chosen.sum(dim=1, dtype=torch.int32)[None, None], indices[None, None]

    def transposed(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same pairs listed per key block: (count, query block indices) as [1, 1, blocks(, width)].
        A key block is in at most ``width`` lists, as the symmetric mask it is a part of shows."""
        key_block = torch.where(chosen, candidates, num_blocks).flatten()  # unchosen pairs sort last
        order = torch.argsort(key_block * num_blocks + query_block.expand_as(candidates).flatten())
        counts = torch.bincount(key_block, minlength=num_blocks + 1)[:num_blocks]
        slots = (counts.cumsum(0) - counts)[:, None] + torch.arange(width, device=device)
        query_of_pair = order.div(width, rounding_mode="floor")  # pair p is (query block p // width, ...)
        indices = query_of_pair[slots.clamp(max=order.numel() - 1)]
        indices = torch.where(torch.arange(width, device=device) < counts[:, None], indices, 0).to(torch.int32)
        return counts.to(torch.int32)[None, None], indices[None, None]

    (partial_count, partial_indices), (full_count, full_indices) = ordered(partial), ordered(full)
    by_key = (partial_count, partial_indices, full_count, full_indices)
    if causal:
        by_key = (*transposed(partial), *transposed(full))
    return BlockMask(
        (padded_len, padded_len),
        partial_count,
        partial_indices,
        full_count,
        full_indices,
        *by_key,
        (block, block),
        allowed,
    )


@functools.cache
def _compiled_flex_attention():
    """FlexAttention is only fast once compiled; eager mode materialises the full score matrix.

    Packed batches vary in token count, so shapes are left to automatic dynamic compilation: one
    recompile with a symbolic length, rather than a new graph for every length up to the
    recompile limit."""
    return torch.compile(flex_attention)


@functools.cache
def backward_runs_on_cpu() -> bool:
    """Whether this torch's FlexAttention backpropagates on a CPU (torch 2.7 does; 2.11 and later
    raise NotImplementedError), found by trying it once on a tiny input."""
    q = torch.zeros(1, 1, 4, 8, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
    except NotImplementedError:
        return False
    return True
