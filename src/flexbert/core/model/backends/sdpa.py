"""PyTorch SDPA on grids holding one document per row, so that no key crosses a document boundary.

Runs everywhere. On the CPU, documents are grouped by length so that grids are not mostly padding;
local layers on long documents run banded, at a cost of length times window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexbert.core.model.layout import Attend, DocumentLayout
from flexbert.core.model.registries import ATTENTION_BACKENDS

# Devices whose tensors the host reads without stalling anything: documents are grouped by length
# only there. Read at call time, so a test can empty it.
GROUPING_DEVICES = ("cpu",)


class DocumentGrid:
    """The documents of ``layout`` laid out one per row: ``[docs, row_length, ...]``, each document's
    tokens starting ``offset`` cells into its row. The grid is filled straight from the stream, where
    ``tokens`` says the layout's tokens sit (all of the stream, in order, by default): one gather.

    A cell no token fills holds a copy of its document's first token rather than zeros. What it holds
    never reaches a real token: as a key it is masked, and its query's output is dropped, so in the
    backward pass it passes on a gradient of exactly zero. When the cells are exactly the stream's
    tokens (every document full-length, no offset), moving in and out of the grid is a free reshape.
    """

    def __init__(self, layout: DocumentLayout, row_length: int, offset: int = 0, tokens: torch.Tensor | None = None):
        self.num_docs, self.row_length = layout.num_docs, row_length
        self.index = layout.doc_ids * row_length + offset + layout.positions  # [T] token -> cell
        self.dense = tokens is None and offset == 0 and self.num_docs * row_length == layout.num_tokens
        if not self.dense:
            in_stream = torch.arange(layout.num_tokens, device=layout.doc_ids.device) if tokens is None else tokens
            # (an empty document, which has no token, takes the layout's last one)
            first_tokens = in_stream[layout.cu_seqlens[:-1].long().clamp(max=layout.num_tokens - 1)]
            self.source = first_tokens.repeat_interleave(row_length)  # [docs * row_length] cell -> token
            self.source[self.index] = in_stream

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """the stream [T_stream, ...] -> [docs, row_length, ...]"""
        if not self.dense:
            x = x.index_select(0, self.source)
        return x.view(self.num_docs, self.row_length, *x.shape[1:])

    def gather(self, grid: torch.Tensor) -> torch.Tensor:
        """[docs, row_length, ...] -> [T, ...], the layout's tokens in its order"""
        flat = grid.flatten(0, 1)
        return flat if self.dense else flat[self.index]


# A local layer attends block by block once documents are this many half-windows long (1024 tokens
# at ModernBERT's window). Each block's keys are copied out with their overlap, three times the
# keys and values to hold for the backward pass; at 512 tokens that memory costs a CPU more than
# the scores it saves (bench/bench_attention.py, bench/bench_model.py).
BANDED_MIN_HALF_WINDOWS = 16


# Documents shorter than this share one group: their grid is cheap whatever their lengths.
GROUP_MIN_LENGTH = 64


@ATTENTION_BACKENDS.register("sdpa")
def prepare_sdpa(layout: DocumentLayout, half_window: int | None, scale: float, causal: bool = False) -> Attend:
    """PyTorch SDPA on grids with one document per row, so no key crosses a document boundary.

    One grid sized for the longest document would spend most of its cells on padding when lengths
    vary, so documents are grouped by length (within a factor of two), each group a grid of its own.
    Grouping reads the lengths, so it happens only where they are on the host (a CPU batch); on a
    GPU that read would stall the device, and one grid serves. Local layers on long documents run
    banded: the cost then grows with length times window rather than with length squared (an
    8192-token document at ModernBERT's window: 43x fewer scores).
    """
    # A group of empty documents (the all-padding rows of a padded batch) has no token to attend.
    groups = [(tokens, group) for tokens, group in _length_groups(layout) if group.num_tokens > 0]
    if not groups or (len(groups) == 1 and groups[0][0] is None):
        return _grid_sdpa(layout, half_window, scale, causal)
    # Each group's grids are filled from the whole stream; their outputs come back in group order.
    parts = [_grid_sdpa(group, half_window, scale, causal, tokens) for tokens, group in groups]
    back_to_stream = torch.argsort(torch.cat([tokens for tokens, _ in groups]))

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        return torch.cat([group_attend(q, k, v, dropout_p) for group_attend in parts])[back_to_stream]

    return attend


def _length_groups(layout: DocumentLayout) -> list[tuple[torch.Tensor | None, DocumentLayout]]:
    """(token indices into the stream, layout of just those documents) per group of documents whose
    lengths round up to the same power of two; one group, the whole stream, on a GPU."""
    if layout.cu_seqlens.device.type not in GROUPING_DEVICES:
        return [(None, layout)]
    lengths = layout.lengths()
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


def _grid_sdpa(
    layout: DocumentLayout, half_window: int | None, scale: float, causal: bool, tokens: torch.Tensor | None = None
) -> Attend:
    """Attention over ``layout``'s documents, reading q, k and v from the stream where ``tokens``
    says they sit (the whole stream by default) and returning the layout's tokens in its order."""
    if half_window is not None and layout.max_seqlen >= BANDED_MIN_HALF_WINDOWS * half_window:
        return _banded_sdpa(layout, half_window, scale, causal, tokens)
    return _full_sdpa(layout, half_window, scale, causal, tokens)


def _full_sdpa(
    layout: DocumentLayout, half_window: int | None, scale: float, causal: bool, tokens: torch.Tensor | None
) -> Attend:
    """Every query of a document scored against every key of it, with a mask where needed."""
    max_len = layout.max_seqlen
    device = layout.doc_ids.device
    grid = DocumentGrid(layout, max_len, tokens=tokens)
    mask = None
    if half_window is not None or causal or not grid.dense:
        key_pos = torch.arange(max_len, device=device)
        allowed = (key_pos[None, :] < layout.lengths()[:, None])[:, None, :]  # [docs, 1, keys]
        behind = key_pos[:, None] - key_pos[None, :]  # [queries, keys]: i - j
        if half_window is not None:
            allowed = allowed & (behind.abs() <= half_window)[None]  # [docs, queries, keys]
        if causal:
            allowed = allowed & (behind >= 0)[None]
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


def _banded_sdpa(
    layout: DocumentLayout, half_window: int, scale: float, causal: bool, tokens: torch.Tensor | None
) -> Attend:
    """Sliding-window attention in blocks of ``half_window`` queries. A block's queries can only
    reach the keys from ``half_window`` before its first query to ``half_window`` after its last,
    so each block is scored against that span of 3·half_window keys alone.
    """
    device = layout.doc_ids.device
    block = half_window
    span = block + 2 * half_window
    num_blocks = -(-layout.max_seqlen // block)
    num_docs = layout.num_docs
    queries = DocumentGrid(layout, num_blocks * block, tokens=tokens)
    # Keys sit half_window cells in, so that block b's span is cells [b·block, b·block + span).
    keys = DocumentGrid(layout, num_blocks * block + 2 * half_window, offset=half_window, tokens=tokens)

    query_pos = torch.arange(num_blocks * block, device=device).view(num_blocks, 1, block, 1)
    key_pos = (torch.arange(num_blocks, device=device) * block - half_window).view(num_blocks, 1, 1, 1) + torch.arange(
        span, device=device
    )  # [blocks, 1, 1, span]
    lengths = layout.lengths().view(num_docs, 1, 1, 1, 1)
    allowed = ((key_pos - query_pos).abs() <= half_window) & (key_pos >= 0) & (key_pos < lengths)
    if causal:  # (the span's keys after the block stay in the grid, masked: one shape for both kinds)
        allowed = allowed & (key_pos <= query_pos)
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
