"""Retrieval evaluation (``flexbert eval-retrieval``): how well a model finds each query's relevant
documents in a corpus.

A scorer turns texts into representations and compares them; a dense model gives one unit vector
per text and compares them by cosine. Each query's ranking of the whole corpus (its best
:data:`DEPTH` documents, equal scores in corpus order) is then scored against the task's relevance
judgements (qrels) as BEIR scores it:

- nDCG@10: the discounted gain of the first 10 over that of the best possible ranking;
- MRR@10: 1 / the position of the first relevant document (0 past position 10);
- recall@1, @10, @100: the share of the relevant documents found in the first 1, 10, 100.

Each is averaged over the queries that have a relevant document. The task is a folder that
``flexbert prepare retrieval`` writes, in BEIR's layout (see :mod:`flexbert.core.beir`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from tqdm import tqdm

from flexbert.core.beir import RetrievalSplit
from flexbert.core.embedders import fitting_tokenizer, load_embedder, with_max_seq_len
from flexbert.core.embedding import Embedder, Framing, embed_documents
from flexbert.core.ranking import ndcg_at_k, recall_at_k, reciprocal_rank_at_k
from flexbert.core.tokenizer import MLMTokenizer
from flexbert.errors import FlexBertError

Role = Literal["query", "document"]
CUTOFFS = {"ndcg": (10,), "mrr": (10,), "recall": (1, 10, 100)}
DEPTH = max(k for ks in CUTOFFS.values() for k in ks)  # the deepest position any metric reads
QUERY_CHUNK = 256  # queries ranked at once: their score matrix is [QUERY_CHUNK, documents]
ENCODE_CHUNK = 4096  # texts tokenized and embedded at once, between progress updates
DEFAULT_MAX_TOKENS_PER_BATCH = 32_768


class RetrievalEvalError(FlexBertError, ValueError):
    """A model and a retrieval task cannot be evaluated together."""


# --- scoring ----------------------------------------------------------------------------------------


class Scorer(Protocol):
    """How a model represents texts and compares them. A dense model encodes a text as one vector
    and compares by cosine; a late-interaction (ColBERT) model would encode one vector per token,
    with its own query and document markers (hence ``role``), and compare by MaxSim."""

    def encode(self, texts: Sequence[str], role: Role) -> Any: ...

    def scores(self, queries: Any, documents: Any) -> torch.Tensor:
        """[queries, documents] similarities; higher is closer."""
        ...


@dataclass
class DenseScorer:
    """One unit vector per text, queries and documents alike, compared by their dot product (cosine)."""

    embedder: Embedder
    tokenizer: MLMTokenizer
    device: torch.device
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH
    progress: bool = False

    def encode(self, texts: Sequence[str], role: Role) -> torch.Tensor:
        config = self.embedder.config
        framing = Framing(config.cls_token_id, config.sep_token_id, self.embedder.max_seq_len)
        vectors = []
        with tqdm(total=len(texts), unit=role, desc=f"embed {role}s", disable=not self.progress) as bar:
            for start in range(0, len(texts), ENCODE_CHUNK):
                chunk = list(texts[start : start + ENCODE_CHUNK])
                framed = [framing(ids) for ids in self.tokenizer.encode_batch(chunk)]
                vectors.append(embed_documents(self.embedder, framed, self.max_tokens_per_batch, self.device))
                bar.update(len(chunk))
        return torch.from_numpy(np.concatenate(vectors)).to(self.device)

    def scores(self, queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
        return queries @ documents.T


def rank(scorer: Scorer, queries: Sequence[str], corpus: Sequence[str], depth: int = DEPTH) -> torch.Tensor:
    """[queries, min(depth, documents)] corpus positions, best first; equal scores keep corpus order,
    so a ranking never depends on the kernel that sorted it."""
    documents = scorer.encode(corpus, "document")
    rankings = []
    for start in range(0, len(queries), QUERY_CHUNK):
        scores = scorer.scores(scorer.encode(queries[start : start + QUERY_CHUNK], "query"), documents)
        rankings.append(scores.sort(dim=1, descending=True, stable=True).indices[:, :depth].cpu())
    return torch.cat(rankings)


# --- metrics ----------------------------------------------------------------------------------------


def ranking_metrics(rankings: torch.Tensor, relevant: Sequence[dict[int, int]]) -> dict[str, float]:
    """The mean of each metric of :data:`CUTOFFS` over the queries, from each query's ranking (corpus
    positions, best first) and its relevant documents' grades by corpus position."""
    gains = torch.tensor(
        [[grades.get(position, 0) for position in ranking] for ranking, grades in zip(rankings.tolist(), relevant)],
        dtype=torch.float64,
    )
    width = max(len(grades) for grades in relevant)
    ideal = torch.tensor(
        [sorted(grades.values(), reverse=True) + [0] * (width - len(grades)) for grades in relevant],
        dtype=torch.float64,
    )
    count = torch.tensor([len(grades) for grades in relevant], dtype=torch.float64)
    per_query = {
        **{f"ndcg_at_{k}": ndcg_at_k(gains, ideal, k) for k in CUTOFFS["ndcg"]},
        **{f"mrr_at_{k}": reciprocal_rank_at_k(gains, k) for k in CUTOFFS["mrr"]},
        **{f"recall_at_{k}": recall_at_k(gains, count, k) for k in CUTOFFS["recall"]},
    }
    return {name: values.mean().item() for name, values in per_query.items()}


@dataclass(frozen=True)
class RetrievalResult:
    queries: int  # those with a relevant document, which the metrics average over
    documents: int
    metrics: dict[str, float]
    seconds: float


def evaluate(scorer: Scorer, split: RetrievalSplit) -> RetrievalResult:
    """Rank ``split``'s corpus for each of its judged queries and score the rankings."""
    start = time.perf_counter()
    position = {document_id: index for index, document_id in enumerate(split.corpus)}
    query_ids = list(split.qrels)
    rankings = rank(scorer, [split.queries[query_id] for query_id in query_ids], list(split.corpus.values()))
    relevant = [
        {position[document_id]: grade for document_id, grade in split.qrels[query_id].items()} for query_id in query_ids
    ]
    metrics = ranking_metrics(rankings, relevant)
    return RetrievalResult(len(query_ids), len(split.corpus), metrics, time.perf_counter() - start)


# --- loading a dense model -------------------------------------------------------------------------


def _tokenizer_for(embedder: Embedder, override: str | None) -> MLMTokenizer:
    """The tokenizer the model reads: ``override``, else the one it was trained with; its ids must fit the model."""
    directory = override if override is not None else embedder.tokenizer_dir
    if directory is None:
        raise RetrievalEvalError("no tokenizer is known for the model; add --tokenizer DIR")
    return fitting_tokenizer(embedder.config, directory)


def dense_scorer(
    model: str | os.PathLike,
    pooling: str | None = None,
    tokenizer: str | None = None,
    max_seq_len: int | None = None,
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
    progress: bool = False,
) -> DenseScorer:
    """A dense scorer of the embedding model at ``model`` (see :func:`flexbert.core.embedders.load_embedder`),
    on the GPU when there is one."""
    if max_tokens_per_batch < 1:
        raise RetrievalEvalError(f"--max-tokens-per-batch must be positive, got {max_tokens_per_batch}")
    embedder = load_embedder(model, pooling)
    if max_seq_len is not None:
        embedder = with_max_seq_len(embedder, max_seq_len, "--max-seq-len")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    embedder.model.to(device=device, dtype=torch.float32)
    return DenseScorer(embedder, _tokenizer_for(embedder, tokenizer), device, max_tokens_per_batch, progress)
