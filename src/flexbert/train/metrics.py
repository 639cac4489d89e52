"""Metrics that torchmetrics and Composer lack: MLM accuracy from predicted ids, entity-level F1
for BIO-tagged token classification, and the ranking metrics of retrieval (nDCG, recall, MRR), which
the fine-tuning metric :class:`Retrieval` and ``flexbert eval-retrieval`` share."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchmetrics
from torchmetrics.utilities import dim_zero_cat

from flexbert.core.model.late_interaction import maxsim
from flexbert.core.ranking import ndcg_at_k, recall_at_k


class MaskedTokenAccuracy(torchmetrics.Metric):
    """Share of labelled tokens predicted right. ``preds`` are predicted ids shaped like ``target``,
    or logits with one more (vocabulary) dimension; targets of -100 are not counted. Counting uses
    no boolean indexing, so an update never waits for the device."""

    full_state_update = False

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = ignore_index
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.dim() == target.dim() + 1:
            preds = preds.argmax(dim=-1)
        counted = target != self.ignore_index
        self.correct += ((preds == target) & counted).sum()
        self.total += counted.sum()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total


class MaskedCrossEntropy(torchmetrics.Metric):
    """Mean cross-entropy over the labelled tokens of an evaluation, from each token's loss (which
    the model's chunked evaluation returns instead of whole logits)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("sum_loss", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, token_losses: torch.Tensor) -> None:
        self.sum_loss += token_losses.sum(dtype=torch.float64)
        self.total += token_losses.shape[0]

    def compute(self) -> torch.Tensor:
        return (self.sum_loss / self.total).float()


class MaskedPerplexity(MaskedCrossEntropy):
    """exp of :class:`MaskedCrossEntropy`."""

    def compute(self) -> torch.Tensor:
        return torch.exp(super().compute())


def entity_spans(tags: Sequence[str]) -> set[tuple[int, int, str]]:
    """(start, end, type) of each entity in a BIO tag sequence; an I- tag that does not continue an
    entity of its type starts one, as conlleval counts it."""
    spans, start, kind = set(), None, None
    for position, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and label == kind
        if start is not None and not continues:
            spans.add((start, position, kind))
            start, kind = None, None
        if prefix == "B" or (prefix == "I" and not continues):
            start, kind = position, label
    return spans


class EntityF1(torchmetrics.Metric):
    """Micro F1 over exactly matching entity spans, per sentence, from word-level tags."""

    def __init__(self, label_names: Sequence[str]):
        super().__init__()
        self.label_names = list(label_names)
        for name in ("true_positives", "predicted", "gold"):
            self.add_state(name, default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, predictions: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
        """predictions, labels: [T] class ids (labels -100 off the first sub-token of a word)."""
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            words = labels[start:end] != -100
            gold = entity_spans([self.label_names[i] for i in labels[start:end][words].tolist()])
            guess = entity_spans([self.label_names[i] for i in predictions[start:end][words].tolist()])
            self.true_positives += len(gold & guess)
            self.predicted += len(guess)
            self.gold += len(gold)

    def compute(self) -> torch.Tensor:
        precision = self.true_positives / self.predicted.clamp(min=1)
        recall = self.true_positives / self.gold.clamp(min=1)
        return 2 * precision * recall / (precision + recall).clamp(min=1e-12)


class Retrieval(torchmetrics.Metric):
    """Recall@k or nDCG@k of retrieving each query's own positive among all positives of the split.

    Embeddings are gathered over the evaluation and ranked once at the end, so the corpus is the
    whole split, not one batch. They are one vector per text, scored by dot product, or, given
    ``token_widths`` (the longest query and document), token vectors scored by MaxSim (late
    interaction), each batch padded to those widths so that batches and ranks concatenate.
    """

    full_state_update = False

    def __init__(self, kind: str, k: int, token_widths: tuple[int, int] | None = None):
        super().__init__()
        if kind not in ("recall", "ndcg"):
            raise ValueError(f"kind must be recall or ndcg, got {kind!r}")
        self.kind, self.k, self.token_widths = kind, k, token_widths
        for state in ("queries", "positives", "query_masks", "positive_masks"):
            self.add_state(state, default=[], dist_reduce_fx="cat")

    def update(
        self,
        queries: torch.Tensor,
        positives: torch.Tensor,
        query_mask: torch.Tensor | None = None,
        positive_mask: torch.Tensor | None = None,
    ) -> None:
        """[n, D] vectors, or [n, L, D] token vectors with their [n, L] masks of real tokens."""
        if query_mask is None:
            self.queries.append(queries.float())
            self.positives.append(positives.float())
            return
        for store, masks, vectors, mask, width in (
            (self.queries, self.query_masks, queries, query_mask, self.token_widths[0]),
            (self.positives, self.positive_masks, positives, positive_mask, self.token_widths[1]),
        ):
            vectors, mask = vectors[:, :width], mask[:, :width]  # beyond the widest text: padding only
            store.append(F.pad(vectors.float(), (0, 0, 0, width - vectors.shape[1])))
            masks.append(F.pad(mask, (0, width - mask.shape[1])))

    def compute(self) -> torch.Tensor:
        queries, positives = (dim_zero_cat(x) for x in (self.queries, self.positives))
        if self.token_widths is None:
            scores = queries @ positives.T  # [N, N]; query i's positive is document i
        else:
            query_masks, positive_masks = (dim_zero_cat(x) for x in (self.query_masks, self.positive_masks))
            # [N, N] in slices of queries: MaxSim holds a similarity per query and document token pair.
            slices = zip(queries.split(64), query_masks.split(64))
            scores = torch.cat([maxsim(q, mask, positives, positive_masks) for q, mask in slices])
        rank = (scores > scores.diagonal()[:, None]).sum(dim=1)  # 0-based rank of the positive
        # Each query's ranking, as relevance by position: 1 where its one relevant document sits.
        gains = (rank[:, None] == torch.arange(self.k, device=rank.device)).float()
        one = torch.ones(len(rank), 1, device=rank.device)
        if self.kind == "recall":
            return recall_at_k(gains, one[:, 0], self.k).mean()
        return ndcg_at_k(gains, one, self.k).mean()
