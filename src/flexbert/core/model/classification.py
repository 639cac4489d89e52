"""Fine-tuning heads: one label per document (classification or regression) or per token, and
sentence embeddings.

The classifiers follow transformers' ModernBERT layout, so they export as
ModernBertForSequenceClassification and ModernBertForTokenClassification: encoder -> (pooling) ->
head -> dropout -> classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexbert.core.model.config import FlexBertConfig
from flexbert.core.model.init import ClassifierProjection
from flexbert.core.model.layout import DocumentLayout
from flexbert.core.model.losses import IGNORE_INDEX
from flexbert.core.model.model import EncodedBatch, FlexBertModel, finish_building
from flexbert.core.model.registries import HEAD

# A document's vector: its first token's hidden state, or the mean of all of its tokens'.
Pooling = Literal["cls", "mean"]


@dataclass
class ClassifierOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # [docs, labels] per document; [B, S, labels] or [T, labels] per token


def check_pooling(pooling: str) -> None:
    if pooling not in get_args(Pooling):
        raise ValueError(f"pooling must be one of {', '.join(get_args(Pooling))}, got {pooling!r}")


def pool_documents(hidden: torch.Tensor, layout: DocumentLayout, pooling: Pooling) -> torch.Tensor:
    """[T, H] -> [docs, H]: each document's first token ("cls") or the mean of its tokens."""
    if pooling == "cls":
        return hidden[layout.cu_seqlens[:-1].long()]
    sums = hidden.new_zeros(layout.num_docs, hidden.shape[-1]).index_add(0, layout.doc_ids, hidden)
    return sums / layout.lengths().to(hidden.dtype)[:, None]


class Classifier(nn.Module):
    """Shared by both tasks: encoder, prediction head, dropout and a biased linear classifier."""

    def __init__(self, config: FlexBertConfig, num_labels: int, classifier_dropout: float = 0.0):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {num_labels}")
        self.config = config
        self.num_labels = num_labels
        self.classifier_dropout = classifier_dropout
        self.model = FlexBertModel(config)
        self.head = HEAD.get(config.blocks.head)(config)
        self.drop = nn.Dropout(classifier_dropout)
        self.classifier = ClassifierProjection(config.hidden_size, num_labels)
        finish_building(self, config)

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(self.head(hidden)))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> ClassifierOutput:
        """Input forms as :meth:`FlexBertModel.encode`; ``labels`` as the task's :meth:`predict` takes them."""
        return self.predict(self.model.encode(input_ids, attention_mask, cu_seqlens, max_seqlen), labels)

    def predict(self, encoded: EncodedBatch, labels: torch.Tensor | None) -> ClassifierOutput:
        raise NotImplementedError


class FlexBertForSequenceClassification(Classifier):
    """One prediction per document; ``num_labels == 1`` means regression (MSE), else cross-entropy."""

    def __init__(
        self, config: FlexBertConfig, num_labels: int, pooling: Pooling = "cls", classifier_dropout: float = 0.0
    ):
        check_pooling(pooling)
        super().__init__(config, num_labels, classifier_dropout)
        self.pooling = pooling

    def predict(self, encoded: EncodedBatch, labels: torch.Tensor | None) -> ClassifierOutput:
        """``labels``: [docs] class ids or targets."""
        logits = self.classify(pool_documents(encoded.hidden, encoded.layout, self.pooling))  # [docs, labels]
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels)
        return ClassifierOutput(loss, logits)


class FlexBertForTokenClassification(Classifier):
    """One prediction per token (e.g. NER); labels of -100 are ignored."""

    def predict(self, encoded: EncodedBatch, labels: torch.Tensor | None) -> ClassifierOutput:
        """``labels``: per token, as ``input_ids`` gives them; -100 where there is none."""
        token_logits = self.classify(encoded.hidden)  # [T, labels]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(token_logits.float(), encoded.flatten(labels), ignore_index=IGNORE_INDEX)
        return ClassifierOutput(loss, encoded.restore(token_logits))


class FlexBertForSentenceEmbedding(nn.Module):
    """Mean-pooled, L2-normalised document embeddings, trained contrastively: each query's positive
    is its target and every other positive in the batch a negative (InfoNCE)."""

    def __init__(self, config: FlexBertConfig, temperature: float = 0.05, pooling: Pooling = "mean"):
        super().__init__()
        check_pooling(pooling)
        self.config = config
        self.temperature = temperature
        self.pooling = pooling
        self.model = FlexBertModel(config)
        finish_building(self, config)

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """[docs, H] unit vectors."""
        encoded = self.model.encode(input_ids, attention_mask, cu_seqlens, max_seqlen)
        return F.normalize(pool_documents(encoded.hidden, encoded.layout, self.pooling), dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int | None = None,
        num_queries: int | None = None,
    ) -> ClassifierOutput:
        """A batch of B queries, then their B positives, then any further documents (hard
        negatives); B is ``num_queries``, half the batch by default. ``logits`` [B, documents] are the
        scaled query-document similarities; the loss is cross-entropy towards each query's positive."""
        embeddings = self.embed(input_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        queries, documents = split_queries(embeddings, num_queries)
        logits = queries @ documents.T / self.temperature
        return ClassifierOutput(in_batch_loss(logits), logits)


def split_queries(texts: torch.Tensor, num_queries: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[texts, ...] -> (the B queries, every document after them); B defaults to half the texts."""
    count = texts.shape[0] // 2 if num_queries is None else num_queries
    return texts[:count], texts[count:]


def in_batch_loss(logits: torch.Tensor) -> torch.Tensor:
    """Contrastive loss over [B, documents] scores: query i's positive is document i, and every
    other document of the batch (the other positives, any hard negatives) is a negative."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits.float(), targets)
