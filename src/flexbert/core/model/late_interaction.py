"""Late interaction (ColBERT): every token of a text becomes a small unit vector, and a query scores a
document by MaxSim, the sum over the query's tokens of each one's best match among the document's.

Queries and documents carry a marker token after [CLS] ([Q] or [D]), and queries are padded to a
fixed length with [MASK] tokens (query expansion) that the encoder attends to like any other token;
:func:`query_tokens` and :func:`document_tokens` build them, as PyLate does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from flexbert.core.model.classification import ClassifierOutput, in_batch_loss, split_queries
from flexbert.core.model.config import FlexBertConfig
from flexbert.core.model.layout import DocumentLayout, scatter_rows
from flexbert.core.model.model import FlexBertModel, finish_building


def query_tokens(ids: np.ndarray, marker_id: int, mask_id: int, length: int) -> np.ndarray:
    """[CLS] text [SEP] -> [CLS] [Q] text [SEP] [MASK]...: exactly ``length`` tokens, the text cut to
    fit (keeping the closing [SEP])."""
    kept = document_tokens(ids, marker_id, length)
    return np.concatenate((kept, np.full(length - len(kept), mask_id, dtype=ids.dtype)))


def document_tokens(ids: np.ndarray, marker_id: int, max_length: int) -> np.ndarray:
    """[CLS] text [SEP] -> [CLS] [D] text [SEP]: at most ``max_length`` tokens, the text cut to fit."""
    text = ids[1:-1][: max_length - 3]
    return np.concatenate((ids[:1], [marker_id], text, ids[-1:])).astype(ids.dtype)


def padded(vectors: torch.Tensor, layout: DocumentLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, D] token vectors of packed texts -> ([texts, longest, D] zero-padded, [texts, longest] mask)."""
    rows = layout.doc_ids * layout.max_seqlen + layout.positions  # each token's slot in the padded grid
    slots = layout.num_docs * layout.max_seqlen
    grid = scatter_rows(vectors, rows, slots).view(layout.num_docs, layout.max_seqlen, -1)
    mask = scatter_rows(torch.ones_like(rows, dtype=torch.bool), rows, slots).view(layout.num_docs, -1)
    return grid, mask


def maxsim(
    queries: torch.Tensor, query_mask: torch.Tensor, documents: torch.Tensor, document_mask: torch.Tensor
) -> torch.Tensor:
    """[Q, Lq, D] and [N, Ld, D] padded token vectors -> [Q, N] scores: for every query token its
    highest similarity to a real token of the document, summed over the query's real tokens."""
    similarity = torch.einsum("qid,njd->qnij", queries, documents)  # [Q, N, Lq, Ld]
    similarity = similarity.masked_fill(~document_mask[None, :, None, :], float("-inf"))
    best = similarity.max(dim=-1).values  # [Q, N, Lq]
    return (best * query_mask[:, None, :]).sum(dim=-1)


def maxsim_per_query(
    queries: torch.Tensor, query_mask: torch.Tensor, documents: torch.Tensor, document_mask: torch.Tensor
) -> torch.Tensor:
    """[Q, Lq, D] queries and [Q * k, Ld, D] documents, query 0's k first -> [Q, k]: each query's
    MaxSim against its own k documents only."""
    count = documents.shape[0] // queries.shape[0]
    documents = documents.view(queries.shape[0], count, *documents.shape[1:])  # [Q, k, Ld, D]
    document_mask = document_mask.view(queries.shape[0], count, -1)
    similarity = torch.einsum("qid,qkjd->qkij", queries, documents)  # [Q, k, Lq, Ld]
    similarity = similarity.masked_fill(~document_mask[:, :, None, :], float("-inf"))
    return (similarity.max(dim=-1).values * query_mask[:, None, :]).sum(dim=-1)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL divergence from the teacher's distribution over each query's candidates (softmax of its
    [Q, k] scores) to the student's."""
    return F.kl_div(
        F.log_softmax(student.float(), dim=-1),
        F.log_softmax(teacher.float(), dim=-1),
        log_target=True,
        reduction="batchmean",
    )


class FlexBertForLateInteraction(nn.Module):
    """Encoder -> a linear projection to ``dim`` without bias -> L2 norm per token; trained with
    in-batch negatives: each query's positive is its target, every other document in the batch a
    negative (cross-entropy over MaxSim scores / ``temperature``)."""

    def __init__(self, config: FlexBertConfig, dim: int = 128, temperature: float = 1.0):
        super().__init__()
        self.config = config
        self.temperature = temperature
        self.model = FlexBertModel(config)
        self.projection = nn.Linear(config.hidden_size, dim, bias=False)
        finish_building(self, config)

    def embed_tokens(
        self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None = None
    ) -> tuple[torch.Tensor, DocumentLayout]:
        """[T] packed texts -> [T, dim] unit vectors, and the texts' layout."""
        encoded = self.model.encode(input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return F.normalize(self.projection(encoded.hidden), dim=-1), encoded.layout

    def embed(
        self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] packed texts -> ([texts, longest, dim] vectors, [texts, longest] mask of real tokens)."""
        return padded(*self.embed_tokens(input_ids, cu_seqlens, max_seqlen))

    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int | None = None,
        num_queries: int | None = None,
        teacher_scores: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        """A batch of B queries, then their B positive documents, then any further documents (hard
        negatives); B is ``num_queries``, half the batch by default. ``logits`` [B, documents] are
        the MaxSim scores of each query against every document; the loss pulls up each query's positive.

        Distillation: with ``teacher_scores`` [B, k], the documents are each query's k candidates in
        turn, ``logits`` [B, k] its MaxSim scores of them, and the loss the KL divergence from the
        teacher's distribution over them to ours (of the scores / ``temperature``)."""
        vectors, mask = self.embed(input_ids, cu_seqlens, max_seqlen)
        queries, documents = split_queries(vectors, num_queries)
        query_mask, document_mask = split_queries(mask, num_queries)
        if teacher_scores is not None:
            scores = maxsim_per_query(queries, query_mask, documents, document_mask)
            return ClassifierOutput(distillation_loss(scores / self.temperature, teacher_scores), scores)
        scores = maxsim(queries, query_mask, documents, document_mask)
        return ClassifierOutput(in_batch_loss(scores / self.temperature), scores)
