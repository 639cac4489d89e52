"""What a fine-tune trained, as its recipe's ``task:`` section says (:class:`TaskConfig`), and how its
model is rebuilt from a finished run's folder without the training stack: the heads of
``flexbert.core.model`` and the late-interaction markers. Training (``flexbert.train.finetune``)
parses the same section and adds the data, the metrics and the loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flexbert.core.checkpoint import saved_model_config
from flexbert.core.model import FlexBertConfig
from flexbert.core.model.classification import Pooling
from flexbert.core.tokenizer import MLMTokenizer, load_tokenizer
from flexbert.errors import CheckpointError
from flexbert.typed_config import ConfigError, from_dict

# A fine-tune's inputs are at most this many tokens unless its recipe says otherwise.
DEFAULT_MAX_SEQ_LEN = 512

MetricName = Literal[
    "accuracy", "f1", "mcc", "pearson", "spearman", "entity_f1", "recall_at_1", "recall_at_10", "ndcg_at_10"
]


@dataclass
class TaskConfig:
    metrics: list[MetricName]
    num_labels: int = 2  # 1 = regression; unused by embeddings
    # One label per text; per word (token classification, CoNLL files); or, trained on (query,
    # positive) pairs with in-batch negatives, sentence embeddings or ColBERT token vectors.
    kind: Literal["sequence", "token", "embedding", "late_interaction"] = "sequence"
    # The scale of the contrastive loss's scores: cosine similarities / 0.05 for embeddings, raw
    # MaxSim scores (up to query_length) for late interaction.
    temperature: float | None = None
    pooling: Pooling = "cls"
    # Late interaction (PyLate's defaults): token vectors of `dim`, queries of exactly
    # `query_length` tokens ([MASK]-expanded), documents of at most `document_length`.
    dim: int = 128
    query_length: int = 32
    document_length: int = 180
    # Late interaction's training signal: in-batch contrastive on (query, positive[, negative]) rows,
    # or distillation of a teacher's scores of each query's candidates (query, documents, scores).
    loss: Literal["contrastive", "distillation"] = "contrastive"
    classifier_dropout: float = 0.0
    label_names: list[str] | None = None  # class names in label order, if the files hold names

    def validate(self, path: str) -> None:
        if self.kind == "token" and (self.label_names is None or len(self.label_names) != self.num_labels):
            raise ConfigError(f"{path}.label_names", "token classification needs its num_labels tag names, in order")
        if self.num_labels < 1:
            raise ConfigError(f"{path}.num_labels", f"must be at least 1, got {self.num_labels}")
        if self.loss == "distillation" and self.kind != "late_interaction":
            raise ConfigError(f"{path}.loss", "distillation trains late-interaction models (kind: late_interaction)")
        if self.temperature is None:
            self.temperature = 1.0 if self.kind == "late_interaction" else 0.05
        if self.temperature <= 0:
            raise ConfigError(f"{path}.temperature", f"must be positive, got {self.temperature}")
        if self.dim < 1:
            raise ConfigError(f"{path}.dim", f"must be at least 1, got {self.dim}")
        for key in ("query_length", "document_length"):
            if getattr(self, key) < 4:  # [CLS], the marker, a token of text, [SEP]
                raise ConfigError(f"{path}.{key}", f"must be at least 4 tokens, got {getattr(self, key)}")


def token_widths(task: TaskConfig) -> tuple[int, int] | None:
    """Late interaction ranks token vectors of queries and documents at most this long."""
    return (task.query_length, task.document_length) if task.kind == "late_interaction" else None


def marker_ids(tokenizer: MLMTokenizer) -> tuple[int, int]:
    """Late interaction's [Q] and [D] markers: the two ids after the tokenizer's last one, the ids
    PyLate gives them when it adds them to the tokenizer."""
    return tokenizer.vocab_size, tokenizer.vocab_size + 1


def with_marker_ids(model_config: FlexBertConfig, tokenizer: MLMTokenizer) -> FlexBertConfig:
    """The model config of a late-interaction model: a vocabulary grown, where it must, to hold the
    markers (their embeddings start at the mean of the others, see :func:`with_vocabulary_of`)."""
    markers_end = marker_ids(tokenizer)[1] + 1
    if model_config.vocab_size >= markers_end:
        return model_config
    return dataclasses.replace(model_config, vocab_size=markers_end)


@dataclass(frozen=True)
class FinetunedRun:
    """What a finished fine-tune's resolved recipe says about its model."""

    task: TaskConfig
    model_config: FlexBertConfig  # the encoder, before any head-specific change (see with_marker_ids)
    tokenizer: MLMTokenizer
    max_seq_len: int


def read_finetuned_run(run_config: Mapping[str, Any], config_file: Path) -> FinetunedRun:
    """The model a fine-tune's resolved recipe (``config_file``, read as ``run_config``) built. Only
    its model, tokenizer, sequence length and task are read: the training data of a finished
    fine-tune is often gone, so the rest is not validated again."""
    if not isinstance(run_config.get("model"), Mapping) or "tokenizer" not in run_config:
        raise CheckpointError(f"{config_file} has no model: section or no tokenizer; is it a fine-tuning recipe?")
    try:
        task = from_dict(TaskConfig, run_config["task"], "task")
        tokenizer = load_tokenizer(run_config["tokenizer"])
        model_config = saved_model_config(run_config["model"], tokenizer)
    except ConfigError as err:
        raise CheckpointError(f"{config_file}: {err}") from None
    return FinetunedRun(task, model_config, tokenizer, run_config.get("max_seq_len", DEFAULT_MAX_SEQ_LEN))
