"""The training config: one typed dataclass tree, validated before anything heavy happens."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexbert.data.streams import LoaderConfig
from flexbert.data.tokenizer import MLMTokenizer, load_tokenizer
from flexbert.model import FlexBertConfig
from flexbert.train.batching import BatchWarmupConfig, parse_time
from flexbert.train.hf_export import HFExportConfig
from flexbert.train.loggers import LoggingConfig
from flexbert.train.nan_guard import NanGuardConfig
from flexbert.train.optimizers import OptimizerConfig
from flexbert.train.sample_ids import DebugConfig
from flexbert.train.schedulers import SchedulerConfig
from flexbert.train.sharding import FSDPConfig
from flexbert.typed_config import ConfigError, from_dict

PRECISIONS = ("auto", "fp32", "amp_bf16", "amp_fp16")


def with_tokenizer_ids(model: dict[str, Any], tokenizer: MLMTokenizer) -> dict[str, Any]:
    """A recipe's model section with its special-token ids taken from the tokenizer unless given;
    given ids must agree with it (a silently wrong pad id is a classic pretraining bug)."""
    tokenizer_ids = {"pad_token_id": tokenizer.pad_id, "cls_token_id": tokenizer.cls_id,
                     "sep_token_id": tokenizer.sep_id}
    for key, token_id in tokenizer_ids.items():
        if key in model and model[key] != token_id:
            raise ConfigError(f"model.{key}", f"{model[key]} disagrees with the tokenizer {tokenizer.path}, "
                              f"whose id is {token_id}")
    return {**model, **tokenizer_ids}


def model_config_for(model: dict[str, Any], tokenizer: MLMTokenizer) -> FlexBertConfig:
    """A recipe's model section, checked against the tokenizer that feeds it: the vocabulary holds
    every token it can produce, and the special-token ids are its own."""
    vocab_size = model.get("vocab_size", FlexBertConfig.__dataclass_fields__["vocab_size"].default)
    if isinstance(vocab_size, int) and tokenizer.vocab_size > vocab_size:
        raise ConfigError("model.vocab_size", f"{vocab_size} is smaller than the "
                          f"{tokenizer.vocab_size} tokens of {tokenizer.path}")
    return FlexBertConfig.from_dict(with_tokenizer_ids(model, tokenizer), path="model")


def check_fits_positions(key_path: str, seq_len: int, model_config: FlexBertConfig) -> None:
    """Refuse sequences longer than the model has positions for now, not at the first long batch."""
    if seq_len > model_config.max_position_embeddings:
        raise ConfigError(key_path, f"{seq_len} exceeds model.max_position_embeddings="
                          f"{model_config.max_position_embeddings}")


@dataclass
class TrainConfig:
    run_name: str
    model: dict[str, Any]  # a FlexBertConfig mapping, with an optional preset; token ids default to the tokenizer's
    train_loader: LoaderConfig
    max_duration: str  # "1_719_000_000_000tok", "5000ba"
    global_batch_rows: int  # sequences (packed rows) per optimizer step, across all ranks
    device_microbatch_rows: int  # rows per forward/backward on one device
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    batch_warmup: BatchWarmupConfig | None = None
    eval_loader: LoaderConfig | None = None
    eval_interval: str = "1000ba"
    eval_subset_num_batches: int = -1
    seed: int = 17
    precision: str = "auto"  # amp_bf16 on GPU, fp32 on CPU
    run_root: str = "runs"  # the run folder is run_root/run_name
    save_folder: str | None = None  # local path or remote URI; default: <run folder>/checkpoints
    save_interval: str = "1000ba"
    save_num_checkpoints_to_keep: int = 3
    autoresume: bool = False
    # Chaining phases: the previous phase's checkpoint, weights only (fresh optimizer, time at 0).
    load_path: str | None = None
    load_weights_only: bool = True
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    nan_guard: NanGuardConfig = field(default_factory=NanGuardConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    hf_export: HFExportConfig | None = None
    fsdp_config: FSDPConfig | None = None  # shard with FSDP2 (train/sharding.py)
    compile: bool = False
    dist_timeout: float = 600.0
    vars: dict[str, Any] = field(default_factory=dict)  # free values for ${vars.NAME} interpolation
    # Resolved at validation, absent from recipes.
    model_config: FlexBertConfig | None = field(default=None, init=False, repr=False)
    tokenizer: MLMTokenizer | None = field(default=None, init=False, repr=False)

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.run_name

    @property
    def checkpoint_folder(self) -> str:
        return self.save_folder or str(self.run_dir / "checkpoints")

    @classmethod
    def from_dict(cls, data: dict[str, Any], world_size: int = 1) -> TrainConfig:
        config = from_dict(cls, data, "")
        config.validate(world_size)
        return config

    def validate(self, world_size: int = 1) -> None:
        self.train_loader.validate("train_loader")
        self.tokenizer = load_tokenizer(self.train_loader.tokenizer)
        self.model_config = model_config_for(self.model, self.tokenizer)
        if self.eval_loader is not None:
            self.eval_loader.validate("eval_loader")
        self.optimizer.validate("optimizer")
        self.scheduler.validate("scheduler")
        for key in ("max_duration", "eval_interval", "save_interval"):
            parse_time(getattr(self, key), key)
        if self.hf_export is not None:
            parse_time(self.hf_export.interval, "hf_export.interval")
        if self.precision not in PRECISIONS:
            raise ConfigError("precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for key in ("global_batch_rows", "device_microbatch_rows", "save_num_checkpoints_to_keep"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, f"must be positive, got {getattr(self, key)}")
        if self.global_batch_rows % world_size:
            raise ConfigError("global_batch_rows", f"{self.global_batch_rows} rows cannot be split evenly over "
                              f"{world_size} processes")
        per_device = self.global_batch_rows // world_size
        if per_device % self.device_microbatch_rows:
            raise ConfigError("device_microbatch_rows", f"{self.device_microbatch_rows} does not divide the "
                              f"{per_device} rows each of the {world_size} processes gets per step")
        if self.fsdp_config is not None:
            self.fsdp_config.validate("fsdp_config", world_size)
        if self.batch_warmup is not None:
            parse_time(self.batch_warmup.duration, "batch_warmup.duration")
            if not 0 < self.batch_warmup.start_rows <= self.global_batch_rows:
                raise ConfigError("batch_warmup.start_rows", f"must be in (0, global_batch_rows="
                                  f"{self.global_batch_rows}], got {self.batch_warmup.start_rows}")
        check_fits_positions("train_loader.max_seq_len", self.train_loader.max_seq_len, self.model_config)
        if self.eval_loader is not None:
            check_fits_positions("eval_loader.max_seq_len", self.eval_loader.max_seq_len, self.model_config)
        if self.load_path is not None and "://" not in self.load_path and not os.path.exists(self.load_path):
            raise ConfigError("load_path", f"checkpoint not found: {self.load_path}")
        if self.autoresume and self.save_folder is not None and "{" in self.save_folder:
            raise ConfigError("save_folder", "autoresume needs a save_folder without format fields")
