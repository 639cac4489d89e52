"""Sequence packing: documents into rows of a fixed token budget, then into unpadded batches.

Every piece in a row is framed ``[CLS] tokens [SEP]``. A document longer than a row is split into
row-sized chunks (never truncated). Each row starts with the oldest pending piece, so none waits
forever, and is then filled best-fit from a look-ahead buffer: the longest piece that still fits
goes in next, which keeps padding well under 1% on real corpora.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from flexbert.data.masking import IGNORE_INDEX


@dataclass(frozen=True)
class Piece:
    """Tokens [start, end) of one document, identified by (stream, sample) in its dataset."""

    stream: int
    sample: int
    start: int
    end: int
    tokens: np.ndarray  # the piece's tokens (not the whole document)

    @property
    def framed_length(self) -> int:
        return self.end - self.start + 2  # [CLS] + tokens + [SEP]

    def key(self) -> tuple[int, int, int, int]:
        return (self.stream, self.sample, self.start, self.end)


def split_document(stream: int, sample: int, tokens: np.ndarray, row_tokens: int) -> list[Piece]:
    """Chunks of at most ``row_tokens - 2`` tokens, so each framed chunk fits one row."""
    chunk = row_tokens - 2
    return [
        Piece(stream, sample, start, min(start + chunk, len(tokens)), tokens[start : start + chunk])
        for start in range(0, len(tokens), chunk)
    ]


class GreedyPacker:
    """Holds pending pieces in arrival order and fills rows best-fit from them."""

    def __init__(self, row_tokens: int, lookahead: int):
        if row_tokens < 3:
            raise ValueError(f"row_tokens must be at least 3 ([CLS] token [SEP]), got {row_tokens}")
        self.row_tokens = row_tokens
        self.lookahead = lookahead
        self.pending: list[Piece] = []

    def add(self, pieces: Iterable[Piece]) -> None:
        self.pending.extend(pieces)

    def has_full_lookahead(self) -> bool:
        return len(self.pending) >= self.lookahead

    def pop_row(self) -> list[Piece]:
        """One row's pieces; empty only when nothing is pending."""
        if not self.pending:
            return []
        row = [self.pending.pop(0)]
        room = self.row_tokens - row[0].framed_length
        while self.pending:
            fitting = [i for i, p in enumerate(self.pending) if p.framed_length <= room]
            if not fitting:
                break
            best = max(fitting, key=lambda i: (self.pending[i].framed_length, -i))
            piece = self.pending.pop(best)
            row.append(piece)
            room -= piece.framed_length
        return row


@dataclass
class PackedBatch:
    """What the unpadded encoder needs, plus bookkeeping for packing efficiency and debugging."""

    input_ids: torch.Tensor  # [T] int64
    labels: torch.Tensor  # [T] int64, -100 where not predicted
    cu_seqlens: torch.Tensor  # [pieces + 1] int32
    max_seqlen: int
    position_ids: torch.Tensor  # [T] int64, restarting at 0 in each piece
    num_rows: int
    row_tokens: int
    row_pieces: torch.Tensor  # [rows + 1] int64: row r holds pieces [row_pieces[r], row_pieces[r+1])
    # [N] int64 positions of the labelled tokens, found here on the host so that neither the
    # sparse head nor the token count needs a device sync for them.
    masked_index: torch.Tensor
    piece_keys: torch.Tensor  # [pieces, 4] int64: stream, sample, start, end

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_masked(self) -> int:
        return self.masked_index.shape[0]

    @property
    def packing_efficiency(self) -> float:
        return self.num_tokens / (self.num_rows * self.row_tokens)

    def as_dict(self) -> dict:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


def collate_rows(rows: Sequence[Sequence[Piece]], row_tokens: int, cls_id: int, sep_id: int, masker, epoch: int) -> PackedBatch:
    """Frame, mask and concatenate the pieces of ``rows`` into one unpadded batch."""
    pieces = [piece for row in rows for piece in row]
    inputs, labels, lengths = [], [], []
    for piece in pieces:
        framed = np.concatenate(([cls_id], piece.tokens.astype(np.int64), [sep_id]))
        corrupted, piece_labels = masker(framed, (epoch, piece.stream, piece.sample, piece.start))
        inputs.append(corrupted)
        labels.append(piece_labels)
        lengths.append(len(framed))
    lengths_t = torch.tensor(lengths, dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths_t, 0, dtype=torch.int32), (1, 0))
    position_ids = torch.from_numpy(np.concatenate([np.arange(n) for n in lengths]))
    all_labels = np.concatenate(labels)
    return PackedBatch(
        input_ids=torch.from_numpy(np.concatenate(inputs)),
        labels=torch.from_numpy(all_labels),
        cu_seqlens=cu_seqlens,
        max_seqlen=max(lengths),
        position_ids=position_ids,
        num_rows=len(rows),
        row_tokens=row_tokens,
        row_pieces=torch.tensor([0, *np.cumsum([len(row) for row in rows])], dtype=torch.int64),
        masked_index=torch.from_numpy(np.flatnonzero(all_labels != IGNORE_INDEX)),
        piece_keys=torch.tensor([piece.key() for piece in pieces], dtype=torch.int64).reshape(-1, 4),
    )
