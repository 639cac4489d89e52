"""The unpadded token stream: how documents sit in it, and moving between padded and unpadded form.

The encoder never sees padding. A batch is a flat stream of T real tokens holding one or more
documents back to back; ``cu_seqlens`` marks where each document starts. Padded ``(B, S)``
batches are unpadded at the model's entrance and repadded at its exit, and packed rows (several
documents per row) are simply streams with more documents than rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
    def from_cu_seqlens(
        cls, cu_seqlens: torch.Tensor, max_seqlen: int | None, num_tokens: int
    ) -> DocumentLayout:
        cu_seqlens = cu_seqlens.to(torch.int32)
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if max_seqlen is None:
            max_seqlen = int(lengths.max())
        doc_ids = torch.repeat_interleave(
            torch.arange(lengths.shape[0], device=cu_seqlens.device), lengths, output_size=num_tokens
        )
        positions = torch.arange(num_tokens, device=cu_seqlens.device) - cu_seqlens.long()[doc_ids]
        return cls(cu_seqlens, int(max_seqlen), doc_ids, positions)


@dataclass(frozen=True)
class Unpadding:
    """Where the real tokens of a padded (B, S) batch live, to go there and back."""

    indices: torch.Tensor  # [T] flat indices of real tokens in the (B*S) grid
    batch_size: int
    seqlen: int
    layout: DocumentLayout

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor) -> Unpadding:
        batch_size, seqlen = attention_mask.shape
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1, dtype=torch.int32)
        indices = torch.nonzero(mask.flatten()).flatten()
        cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        layout = DocumentLayout.from_cu_seqlens(cu_seqlens, int(lengths.max()), indices.shape[0])
        return cls(indices, batch_size, seqlen, layout)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> [T, ...]"""
        return padded.flatten(0, 1)[self.indices]

    def repad(self, unpadded: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[T, ...] -> [B, S, ...], with ``fill`` at padding positions."""
        return scatter_rows(unpadded, self.indices, self.batch_size * self.seqlen, fill).unflatten(
            0, (self.batch_size, self.seqlen)
        )


def scatter_rows(rows: torch.Tensor, indices: torch.Tensor, num_rows: int, fill: float = 0.0) -> torch.Tensor:
    """Place ``rows[i]`` at row ``indices[i]`` of a new ``[num_rows, ...]`` tensor (differentiable)."""
    out = rows.new_full((num_rows, *rows.shape[1:]), fill)
    return out.index_put((indices,), rows)
