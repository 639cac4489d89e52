"""What every run shares, pretraining or fine-tuning: the common recipe keys (:class:`RunConfig`), the
model a recipe builds for its tokenizer, the precision, and the Trainer arguments these imply.

The two builders, ``train/pretrain.py`` and ``train/finetune.py``, each define their config as a
:class:`RunConfig` with their own keys, and pass :func:`shared_trainer_arguments` to Composer's Trainer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from composer.utils import dist

from flexbert.core.checkpoint import RunDir
from flexbert.core.model import FlexBertConfig
from flexbert.train.loggers import LoggingConfig, build_loggers
from flexbert.train.optimizers import OptimizerConfig, build_optimizer
from flexbert.train.schedulers import SchedulerConfig, build_scheduler, parse_time
from flexbert.typed_config import ConfigError

# ``auto`` is amp_bf16 on a GPU and fp32 elsewhere (see :func:`resolve_precision`).
Precision = Literal["auto", "fp32", "amp_bf16", "amp_fp16"]


def resolve_precision(requested: Precision) -> str:
    """The precision Composer runs in; mixed precision without a GPU is refused in one line
    (Composer would fail with a traceback when the trainer is built)."""
    if requested == "auto":
        return "amp_bf16" if torch.cuda.is_available() else "fp32"
    if requested != "fp32" and not torch.cuda.is_available():
        raise ConfigError("precision", f"{requested} needs a GPU, and this machine has none; use fp32 or auto")
    return requested


def check_fits_positions(key_path: str, seq_len: int, model_config: FlexBertConfig) -> None:
    """Refuse sequences longer than the model has positions for now, not at the first long batch."""
    if seq_len > model_config.max_position_embeddings:
        raise ConfigError(
            key_path, f"{seq_len} exceeds model.max_position_embeddings={model_config.max_position_embeddings}"
        )


@dataclass(kw_only=True)
class RunConfig:
    """The keys of every recipe."""

    run_name: str
    # A FlexBertConfig mapping, with an optional preset; token ids default to the tokenizer's. A run
    # continuing a published encoder (init_from.hf) takes the architecture from it instead.
    model: dict[str, Any] = field(default_factory=dict)
    max_duration: str  # "1_719_000_000_000tok", "5000ba", "3ep"
    run_root: str = "runs"  # the run folder is run_root/run_name
    seed: int = 17
    precision: Precision = "auto"
    eval_interval: str = "1000ba"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    vars: dict[str, Any] = field(default_factory=dict)  # free values for ${vars.NAME} interpolation
    # Resolved at validation, absent from recipes.
    model_config: FlexBertConfig | None = field(default=None, init=False, repr=False)

    @property
    def run_dir(self) -> RunDir:
        return RunDir.of(self.run_root, self.run_name)

    def validate(self, path: str = "") -> None:
        parse_time(self.max_duration, "max_duration")
        self.validate_eval_interval()

    def validate_eval_interval(self) -> None:
        if parse_time(self.eval_interval, "eval_interval").value <= 0:
            raise ConfigError("eval_interval", f"must be positive, got {self.eval_interval!r}")


def shared_trainer_arguments(
    config: RunConfig, model: torch.nn.Module, resolved: Mapping[str, Any], precision: str
) -> dict[str, Any]:
    """The Trainer arguments that every run sets alike: its name, optimizer and schedule, loggers,
    ``precision`` (from :func:`resolve_precision`, which a builder calls first, before any work) and
    seed. Writes the resolved recipe into the run folder, as the run starts."""
    optimizer = build_optimizer(model, config.optimizer)  # first: a model it cannot step leaves no run folder
    if dist.get_global_rank() == 0:
        config.run_dir.write_config(resolved)
    return dict(
        run_name=config.run_name,
        optimizers=optimizer,
        schedulers=build_scheduler(config.scheduler),
        step_schedulers_every_batch=True,
        eval_interval=config.eval_interval.replace("_", ""),
        loggers=build_loggers(config.logging, config.run_dir.path, config.run_name),
        progress_bar=config.logging.progress_bar,
        log_to_console=not config.logging.progress_bar,
        precision=precision,
        seed=config.seed,
    )
