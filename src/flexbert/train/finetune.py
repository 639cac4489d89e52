"""Phase 3: fine-tuning a pretrained encoder on a labelled task (GLUE-style classification or
regression), from one of this project's checkpoints or a Hugging Face ModernBERT directory."""

from __future__ import annotations

import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchmetrics
from composer import Evaluator, Trainer
from composer.callbacks import LRMonitor
from composer.core import Callback, DataSpec, State, Time, TimeUnit
from composer.loggers import Logger
from composer.models import ComposerModel
from composer.utils import dist, reproducibility

from flexbert.core.checkpoint import is_sharded, model_config_for, read_weights, write_weights
from flexbert.core.hf import from_hf
from flexbert.core.model import (
    FlexBertForSentenceEmbedding,
    FlexBertForSequenceClassification,
    FlexBertForTokenClassification,
)
from flexbert.core.model.late_interaction import FlexBertForLateInteraction, document_tokens, query_tokens
from flexbert.core.model.losses import IGNORE_INDEX
from flexbert.core.tasks import DEFAULT_MAX_SEQ_LEN, MetricName, TaskConfig, marker_ids, token_widths, with_marker_ids
from flexbert.core.tokenizer import MLMTokenizer, load_tokenizer
from flexbert.data.labeled import (
    DistillationSplit,
    LabeledDataError,
    LabeledSplit,
    PairSplit,
    SplitConfig,
    batches,
    distillation_batches,
    global_batches,
    load_conll_split,
    load_distillation_split,
    load_pair_split,
    load_split,
    pair_batches,
)
from flexbert.train.config import RunConfig, check_fits_positions, resolve_precision, shared_trainer_arguments
from flexbert.train.metrics import EntityF1, Retrieval
from flexbert.train.nan_guard import NanGuard, NanGuardConfig, labelled_examples
from flexbert.train.optimizers import OptimizerConfig
from flexbert.train.schedulers import SchedulerConfig
from flexbert.train.step import full_weights
from flexbert.typed_config import ConfigError, from_dict

# Each task's official metric (GLUE's, and entity F1 for NER), built from the task config.
METRICS = {
    "accuracy": lambda task: torchmetrics.Accuracy(task="multiclass", num_classes=task.num_labels),
    "f1": lambda task: torchmetrics.F1Score(task="binary"),
    "mcc": lambda task: torchmetrics.MatthewsCorrCoef(task="multiclass", num_classes=task.num_labels),
    "pearson": lambda task: torchmetrics.PearsonCorrCoef(),
    "spearman": lambda task: torchmetrics.SpearmanCorrCoef(),
    "entity_f1": lambda task: EntityF1(task.label_names),
    "recall_at_1": lambda task: Retrieval("recall", 1, token_widths(task)),
    "recall_at_10": lambda task: Retrieval("recall", 10, token_widths(task)),
    "ndcg_at_10": lambda task: Retrieval("ndcg", 10, token_widths(task)),
}
assert set(typing.get_args(MetricName)) == METRICS.keys()


@dataclass(kw_only=True)
class FinetuneConfig(RunConfig):
    """A fine-tuning recipe (phase 3): a labelled task, with the keys every run has (:class:`RunConfig`)."""

    tokenizer: str
    task: TaskConfig
    train_split: SplitConfig
    eval_splits: dict[str, SplitConfig]  # evaluator name -> split, e.g. {matched: ..., mismatched: ...}
    load_path: str | None = None  # a Composer checkpoint of this project or an HF ModernBERT dir
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    batch_size: int = 32  # examples per optimizer step, over all processes together
    nan_guard: NanGuardConfig = field(default_factory=NanGuardConfig)
    early_stopping: EarlyStoppingConfig | None = None
    max_duration: str = "3ep"
    eval_interval: str = "1ep"  # also a fraction of an epoch, "0.25ep": four evaluations per epoch
    optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(
            name="decoupled_adamw", lr=5e-5, betas=[0.9, 0.98], eps=1e-6, weight_decay=1e-5
        )
    )
    scheduler: SchedulerConfig = field(
        default_factory=lambda: SchedulerConfig(
            name="warmup_stable_decay", warmup="0.1dur", decay="0.9dur", decay_shape="linear"
        )
    )
    # Resolved at validation, absent from recipes.
    mlm_tokenizer: MLMTokenizer | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        return from_dict(cls, data, "")

    def validate_eval_interval(self) -> None:
        fraction = epoch_fraction(self.eval_interval)
        if fraction is None:
            super().validate_eval_interval()
        elif fraction <= 0:
            raise ConfigError("eval_interval", f"must be a positive part of an epoch, got {self.eval_interval!r}")

    def validate(self, path: str = "") -> None:
        """Called by the typed-config builder once every section has validated itself."""
        super().validate(path)
        if not self.eval_splits:
            raise ConfigError("eval_splits", "name at least one evaluation split")
        if self.load_path is not None and not os.path.exists(self.load_path):
            raise ConfigError("load_path", f"not found: {self.load_path}")
        self.mlm_tokenizer = load_tokenizer(self.tokenizer)
        self.model_config = model_config_for(self.model, self.mlm_tokenizer)
        check_fits_positions("max_seq_len", self.max_seq_len, self.model_config)
        if self.task.kind == "late_interaction":
            self.model_config = with_marker_ids(self.model_config, self.mlm_tokenizer)
            for key in ("query_length", "document_length"):
                check_fits_positions(f"task.{key}", getattr(self.task, key), self.model_config)


def epoch_fraction(interval: str) -> float | None:
    """How many epochs ``interval`` names when it is written in epochs ("0.25ep", "2ep"), else None."""
    match = re.fullmatch(r"(\d+|\d*\.\d+)ep", interval.replace("_", ""))
    return float(match[1]) if match else None


def eval_interval_in_batches(interval: str, batches_per_epoch: int) -> str:
    """``interval`` as Composer takes it: a part of an epoch ("0.25ep", which Composer cannot count)
    becomes that many of the epoch's batches, at least one; anything else is kept."""
    epochs = epoch_fraction(interval)
    if epochs is None or epochs.is_integer():
        return interval.replace("_", "")
    return f"{max(1, round(epochs * batches_per_epoch))}ba"


@dataclass
class EarlyStoppingConfig:
    """``early_stopping:`` judge each evaluation by the task's first metric on the first eval split
    (higher is better for every metric here): stop after ``patience`` evaluations without a new
    best, and with ``save_best`` keep the best evaluation's weights in RUN_DIR/checkpoints/best.pt,
    which a next fine-tuning loads with ``load_path`` (as GLUE starts RTE from MNLI's best)."""

    patience: int | None = 2  # None: never stop early, only keep the best
    save_best: bool = True

    def validate(self, path: str) -> None:
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"{path}.patience", f"must be at least 1 evaluation, got {self.patience}")


class BestEvaluation(Callback):
    """Follows one metric of one evaluator: logs ``metrics/<label>/best_<metric>``, saves the weights
    at each new best (rank 0 writes, every rank waits), and stops after ``patience`` evaluations
    without one."""

    def __init__(self, config: EarlyStoppingConfig, label: str, metric: str, best_path: Path):
        self.config, self.label, self.metric, self.best_path = config, label, metric, best_path
        self.best: float | None = None
        self.since_best = 0

    def eval_end(self, state: State, logger: Logger) -> None:
        if state.dataloader_label != self.label:
            return
        value = float(state.eval_metrics[self.label][self.metric].compute())
        if self.best is None or value > self.best:
            self.best, self.since_best = value, 0
            if self.config.save_best:
                weights = full_weights(state.model)
                if dist.get_global_rank() == 0:
                    write_weights(self.best_path, weights)
                dist.barrier()
        else:
            self.since_best += 1
        logger.log_metrics({f"metrics/{self.label}/best_{self.metric}": self.best})
        if self.config.patience is not None and self.since_best >= self.config.patience:
            state.stop_training()


class ComposerClassifier(ComposerModel):
    def __init__(self, model: FlexBertForSequenceClassification | FlexBertForTokenClassification, task: TaskConfig):
        super().__init__()
        self.model = model
        self.eval_metrics = {name: METRICS[name](task) for name in task.metrics}

    def forward(self, batch: dict):
        if isinstance(self.model, (FlexBertForSentenceEmbedding, FlexBertForLateInteraction)):
            distilled = {"teacher_scores": batch["teacher_scores"]} if "teacher_scores" in batch else {}
            return self.model(
                batch["input_ids"], batch["cu_seqlens"], batch["max_seqlen"], batch["num_queries"], **distilled
            )
        return self.model(
            batch["input_ids"], labels=batch["labels"], cu_seqlens=batch["cu_seqlens"], max_seqlen=batch["max_seqlen"]
        )

    def loss(self, outputs, batch: dict) -> torch.Tensor:
        return outputs.loss

    def eval_forward(self, batch: dict, outputs=None):
        if isinstance(self.model, (FlexBertForSentenceEmbedding, FlexBertForLateInteraction)):  # retrieval ranks them
            return self.model.embed(batch["input_ids"], cu_seqlens=batch["cu_seqlens"], max_seqlen=batch["max_seqlen"])
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict:
        return {} if is_train else self.eval_metrics

    def update_metric(self, batch: dict, outputs, metric) -> None:
        if isinstance(metric, Retrieval):  # each query's own positive among the split's positives
            count = batch["num_queries"]  # queries, then their positives; hard negatives only train
            if isinstance(outputs, tuple):  # token vectors and their mask
                vectors, mask = outputs
                metric.update(vectors[:count], vectors[count : 2 * count], mask[:count], mask[count : 2 * count])
            else:
                metric.update(outputs[:count], outputs[count : 2 * count])
            return
        logits = outputs.logits
        predictions = logits.squeeze(-1) if self.model.num_labels == 1 else logits.argmax(-1)
        if isinstance(metric, EntityF1):
            metric.update(predictions, batch["labels"], batch["cu_seqlens"])
        elif isinstance(self.model, FlexBertForTokenClassification):
            labelled = batch["labels"] != IGNORE_INDEX
            metric.update(predictions[labelled], batch["labels"][labelled])
        else:
            metric.update(predictions, batch["labels"])


class Epochs:
    """A split as Composer's dataloader: a new shuffle every epoch and, under several processes,
    this rank's share of every global batch of ``batch_size`` examples (the same count of batches on
    every rank, together covering the split once)."""

    def __init__(self, split: LabeledSplit | PairSplit | DistillationSplit, batch_size: int, shuffle: bool, seed: int):
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.batches = {PairSplit: pair_batches, DistillationSplit: distillation_batches}.get(type(split), batches)
        self.rank, self.world = dist.get_global_rank(), dist.get_world_size()
        self.epoch = 0

    def __iter__(self):
        self.epoch += 1
        return self.batches(self.split, self.batch_size, self.shuffle, self.seed + self.epoch, self.rank, self.world)

    def __len__(self) -> int:
        return len(global_batches(len(self.split.token_ids), self.batch_size, self.world))


def _data_spec(epochs: Epochs) -> DataSpec:
    # Fine-tuning batches are small: each is one microbatch (device_train_microbatch_size = batch_size).
    return DataSpec(
        epochs,
        get_num_samples_in_batch=lambda b: b["cu_seqlens"].shape[0] - 1,
        get_num_tokens_in_batch=lambda b: b["input_ids"].shape[0],
        split_batch=lambda batch, microbatch_size: [batch],
    )


def load_pretrained(model: FlexBertForSequenceClassification | FlexBertForTokenClassification, path: str) -> None:
    """Encoder and head weights from an MLM checkpoint (ours or Hugging Face); the classifier stays new."""
    if os.path.isdir(path) and not is_sharded(path):
        weights = from_hf(path).state_dict()
    else:
        weights, _ = read_weights(path)
    new_for_task = ("classifier.", "projection.")
    wanted = {name for name in model.state_dict() if not name.startswith(new_for_task)}
    missing = sorted(wanted - weights.keys())
    if missing:
        raise ConfigError("load_path", f"{path} lacks {len(missing)} encoder weights, e.g. {missing[0]}")
    weights = with_vocabulary_of(model, weights)
    try:
        model.load_state_dict({name: weights[name] for name in wanted}, strict=False)
    except RuntimeError as err:
        raise ConfigError("load_path", f"{path} was saved from a different architecture: {err}") from None


def with_vocabulary_of(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` with the token embeddings grown to ``model``'s vocabulary (late interaction's
    markers): the new rows start at the mean of the pretrained ones."""
    name = "model.embeddings.tok_embeddings.weight"
    target = model.state_dict()[name]
    have = weights[name]
    if have.shape[0] >= target.shape[0] or have.shape[1:] != target.shape[1:]:
        return weights
    extra = have.float().mean(dim=0, keepdim=True).to(have.dtype).expand(target.shape[0] - have.shape[0], -1)
    return {**weights, name: torch.cat((have, extra))}


def build_finetune_trainer(config: FinetuneConfig, resolved: dict) -> Trainer:
    reproducibility.seed_all(config.seed)
    precision = resolve_precision(config.precision)
    tokenizer, model_config, task = config.mlm_tokenizer, config.model_config, config.task

    def load(split: SplitConfig, key_path: str) -> LabeledSplit | PairSplit | DistillationSplit:
        if task.kind == "embedding":
            return load_pair_split(split, tokenizer, config.max_seq_len, key_path)
        if task.kind == "late_interaction" and task.loss == "distillation" and key_path == "train_split":
            rows = load_distillation_split(split, tokenizer, config.max_seq_len, key_path)
            query_marker, document_marker = marker_ids(tokenizer)
            return DistillationSplit(
                [query_tokens(ids, query_marker, tokenizer.mask_id, task.query_length) for ids in rows.queries],
                [
                    [document_tokens(ids, document_marker, task.document_length) for ids in docs]
                    for docs in rows.documents
                ],
                rows.teacher_scores,
            )
        if task.kind == "late_interaction":
            pairs = load_pair_split(split, tokenizer, config.max_seq_len, key_path)
            query_marker, document_marker = marker_ids(tokenizer)
            documents = [pairs.positives, *([pairs.negatives] if pairs.negatives is not None else [])]
            return PairSplit(
                [query_tokens(ids, query_marker, tokenizer.mask_id, task.query_length) for ids in pairs.queries],
                *([document_tokens(ids, document_marker, task.document_length) for ids in side] for side in documents),
            )
        if task.kind == "token":
            return load_conll_split(split.path, tokenizer, task.label_names, config.max_seq_len, key_path, split.limit)
        return load_split(split, tokenizer, task.num_labels, config.max_seq_len, task.label_names, key_path)

    train_split = load(config.train_split, "train_split")
    eval_splits = {name: load(split, f"eval_splits.{name}") for name, split in config.eval_splits.items()}
    world = dist.get_world_size()
    if config.batch_size < world:
        raise ConfigError("batch_size", f"{config.batch_size} examples cannot be shared out over {world} processes")
    for key_path, split in [("train_split", train_split), *((f"eval_splits.{n}", s) for n, s in eval_splits.items())]:
        if len(split.token_ids) < world:
            raise LabeledDataError(
                f"{key_path}: {len(split.token_ids)} examples cannot be shared out over {world} processes"
            )
    if task.kind == "embedding":
        model = FlexBertForSentenceEmbedding(model_config, task.temperature, task.pooling)
    elif task.kind == "late_interaction":
        model = FlexBertForLateInteraction(model_config, task.dim, task.temperature)
    elif task.kind == "token":
        model = FlexBertForTokenClassification(model_config, task.num_labels, task.classifier_dropout)
    else:
        model = FlexBertForSequenceClassification(model_config, task.num_labels, task.pooling, task.classifier_dropout)
    if config.load_path is not None:
        load_pretrained(model, config.load_path)
    train_epochs = Epochs(train_split, config.batch_size, True, config.seed)
    # Schedules resolve fractions of the run in batches, so a duration in epochs is given in batches.
    duration = Time.from_timestring(config.max_duration)
    if duration.unit == TimeUnit.EPOCH:
        duration = Time(duration.value * len(train_epochs), TimeUnit.BATCH)
    early_stopping = []
    if config.early_stopping is not None:
        first_split, first_metric = next(iter(eval_splits)), task.metrics[0]
        best_path = config.run_dir.checkpoints / "best.pt"
        early_stopping.append(BestEvaluation(config.early_stopping, first_split, first_metric, best_path))
    return Trainer(
        **{
            **shared_trainer_arguments(config, model, resolved, precision),
            "eval_interval": eval_interval_in_batches(config.eval_interval, len(train_epochs)),
        },
        model=ComposerClassifier(model, task),
        train_dataloader=_data_spec(train_epochs),
        eval_dataloader=[
            Evaluator(
                label=name,
                dataloader=_data_spec(Epochs(split, config.batch_size, False, 0)),
                metric_names=task.metrics,
                device_eval_microbatch_size=config.batch_size,
            )
            for name, split in eval_splits.items()
        ],
        max_duration=duration,
        device_train_microbatch_size=config.batch_size,
        # The pretraining monitors assume packed MLM batches.
        callbacks=[
            LRMonitor(),
            NanGuard(config.nan_guard, labelled_examples(config.train_split.path), config.run_dir.path),
            *early_stopping,
        ],
    )
