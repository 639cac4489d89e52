"""The ranking metrics of retrieval, per query, from the relevance grades of a ranking's documents in
ranked order: nDCG, recall and the reciprocal rank at a cutoff. Fine-tuning's retrieval metric
(``flexbert.train.metrics.Retrieval``) and ``flexbert eval-retrieval`` both score with these.
"""

from __future__ import annotations

import torch


def dcg_at_k(gains: torch.Tensor, k: int) -> torch.Tensor:
    """[queries] discounted cumulative gain of the first k of each row of ``gains`` [queries, ranks]:
    the relevance grade of the document ranked at each position, discounted by log2(position + 1)."""
    top = gains[:, :k]
    positions = torch.arange(top.shape[1], dtype=top.dtype, device=top.device)
    return (top / torch.log2(positions + 2)).sum(dim=1)


def ndcg_at_k(gains: torch.Tensor, ideal_gains: torch.Tensor, k: int) -> torch.Tensor:
    """[queries] DCG@k of the ranking over DCG@k of the best one: ``ideal_gains`` holds each query's
    relevance grades sorted from the highest (zero-padded), the ranking that puts them first."""
    return dcg_at_k(gains, k) / dcg_at_k(ideal_gains, k)


def recall_at_k(gains: torch.Tensor, relevant: torch.Tensor, k: int) -> torch.Tensor:
    """[queries] share of each query's ``relevant`` documents ranked in its first k."""
    return (gains[:, :k] > 0).sum(dim=1) / relevant


def reciprocal_rank_at_k(gains: torch.Tensor, k: int) -> torch.Tensor:
    """[queries] 1 / the position of the first relevant document, 0 when none is in the first k."""
    hits = gains[:, :k] > 0
    first = hits.int().argmax(dim=1)  # the first True; 0 when there is none, masked below
    return torch.where(hits.any(dim=1), 1 / (first + 1).to(gains.dtype), 0.0)
