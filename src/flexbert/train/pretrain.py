"""Pretraining: the recipe of a masked-language-modelling phase, and the Composer Trainer it builds.

``build_trainer`` is the pretraining builder; ``train/finetune.py`` has the same shape for phase 3.
What one step of the built trainer does, hook by hook, is told in ``train/step.py``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from composer import Evaluator, Trainer
from composer.utils import dist, get_device, reproducibility

from flexbert.core.checkpoint import check_checkpoint_matches, is_remote, load_weights, model_config_for
from flexbert.core.model import FlexBertForMaskedLM
from flexbert.core.tokenizer import MLMTokenizer, load_tokenizer
from flexbert.data.loader import PackedMLMLoader
from flexbert.data.streams import LoaderConfig, derived_seed
from flexbert.train.config import RunConfig, check_fits_positions, resolve_precision, shared_trainer_arguments
from flexbert.train.data_order import RETIRED_RECIPE_KEYS, DataOrderConfig, DataOrderRecord
from flexbert.train.hf_export import HFExport, HFExportConfig
from flexbert.train.init_from import InitFromConfig, initialise_weights, resolve_continued_model
from flexbert.train.monitors import LoaderMonitor, build_monitors
from flexbert.train.nan_guard import NanGuard, NanGuardConfig, packed_pieces
from flexbert.train.resume import (
    LoaderCheckpoint,
    RemoteCheckpointStaging,
    SigtermCheckpoint,
    check_on_rank_zero,
    prepare_autoresume,
    prepare_remote_save_folder,
)
from flexbert.train.schedulers import parse_time
from flexbert.train.sharding import FSDPConfig, average_gradients_over_gloo, composer_fsdp2_config, mark_sharding_units
from flexbert.train.step import BatchSizeSchedule, BatchWarmupConfig, ComposerMLM, data_spec, phase_length, phase_rows
from flexbert.typed_config import ConfigError, from_dict


@dataclass(kw_only=True)
class TrainConfig(RunConfig):
    """A pretraining recipe (phases 1 and 2, and the decay): masked-language modelling on packed
    streams, with the keys every run has (:class:`RunConfig`)."""

    train_loader: LoaderConfig
    global_batch_rows: int  # sequences (packed rows) per optimizer step, across all ranks
    device_microbatch_rows: int  # rows per forward/backward on one device
    batch_warmup: BatchWarmupConfig | None = None
    eval_loader: LoaderConfig | None = None
    eval_subset_num_batches: int = -1
    save_folder: str | None = None  # local path or remote URI; default: <run folder>/checkpoints
    save_interval: str = "1000ba"
    save_num_checkpoints_to_keep: int = 3
    autoresume: bool = False
    # Chaining phases: the previous phase's checkpoint, weights only (fresh optimizer, time at 0).
    load_path: str | None = None
    load_weights_only: bool = True
    # A published encoder to continue, or a smaller model to tile (train/init_from.py).
    init_from: InitFromConfig | None = None
    nan_guard: NanGuardConfig = field(default_factory=NanGuardConfig)
    data_order: DataOrderConfig = field(default_factory=DataOrderConfig)
    RETIRED_KEYS = RETIRED_RECIPE_KEYS  # debug: (log_sample_ids), which data_order replaced
    hf_export: HFExportConfig | None = None
    fsdp_config: FSDPConfig | None = None  # shard with FSDP2 (train/sharding.py)
    compile: bool = False
    dist_timeout: float = 600.0
    # Resolved at validation, absent from recipes.
    tokenizer: MLMTokenizer | None = field(default=None, init=False, repr=False)
    model_section: dict[str, Any] | None = field(default=None, init=False, repr=False)  # as recorded

    @property
    def checkpoint_folder(self) -> str:
        return self.save_folder or str(self.run_dir.checkpoints)

    @classmethod
    def from_dict(cls, data: dict[str, Any], world_size: int = 1) -> TrainConfig:
        """The validated config of a run on ``world_size`` processes."""
        config = from_dict(cls, data, "")
        config.check_world_size(world_size)
        if config.model_config.causal:
            for loader in ("train_loader", "eval_loader"):
                if "masking" in (data.get(loader) or {}):
                    raise ConfigError(
                        f"{loader}.masking",
                        "model.objective is clm, which predicts every next token and masks none; remove this section",
                    )
        return config

    def validate(self, path: str = "") -> None:
        """Called by the typed-config builder once every section has validated itself: the checks
        that span sections, and the model, whose special-token ids come from the tokenizer."""
        super().validate(path)
        # Each phase draws its own order and masks (a later phase never replays an earlier one's
        # (sample, mask) pairs); a resumed run keeps them. Seeds a recipe gives are kept.
        self.train_loader = self.train_loader.with_seeds(
            derived_seed(self.run_name, "shuffle"), derived_seed(self.run_name, "masks")
        )
        self._resolve_model_and_tokenizer()
        if self.train_loader.rows_per_batch is not None:
            raise ConfigError(
                "train_loader.rows_per_batch",
                "training batches are sized by global_batch_rows and device_microbatch_rows; remove this key",
            )
        parse_time(self.save_interval, "save_interval")
        for key in ("global_batch_rows", "device_microbatch_rows", "save_num_checkpoints_to_keep"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, f"must be positive, got {getattr(self, key)}")
        if self.batch_warmup is not None and not 0 < self.batch_warmup.start_rows <= self.global_batch_rows:
            raise ConfigError(
                "batch_warmup.start_rows",
                f"must be in (0, global_batch_rows={self.global_batch_rows}], got {self.batch_warmup.start_rows}",
            )
        check_fits_positions("train_loader.max_seq_len", self.train_loader.max_seq_len, self.model_config)
        if self.train_loader.masking.scheduled:
            phase_length(self.max_duration)
        if self.eval_loader is not None:
            check_fits_positions("eval_loader.max_seq_len", self.eval_loader.max_seq_len, self.model_config)
            if self.eval_loader.masking.scheduled:
                raise ConfigError(
                    "eval_loader.masking.mlm_probability",
                    "evaluation masks at one rate, so that its losses compare over the run; give a number",
                )
        if self.load_path is not None and not is_remote(self.load_path) and not os.path.exists(self.load_path):
            raise ConfigError("load_path", f"checkpoint not found: {self.load_path}")
        if self.init_from is not None and self.load_path is not None:
            raise ConfigError(
                "init_from", "starts the weights afresh from another model; give it or load_path, not both"
            )
        if self.autoresume and self.save_folder is not None and "{" in self.save_folder:
            raise ConfigError("save_folder", "autoresume needs a save_folder without format fields")

    def _resolve_model_and_tokenizer(self) -> None:
        """The tokenizer and the model config: from the recipe, or, continuing a published encoder,
        from the source (whose tokenizer the loaders read unless they name one)."""
        source = self.init_from.source if self.init_from is not None else None
        if source is not None:
            continued = resolve_continued_model(self.model, source, self.train_loader.tokenizer)
            self.tokenizer, self.model_config = continued.tokenizer, continued.config
            self.model_section = continued.section
        elif self.train_loader.tokenizer is None:
            raise ConfigError(
                "train_loader.tokenizer",
                "missing: name a tokenizer directory (a run continuing a published encoder with "
                "init_from.hf reads the source's by default)",
            )
        else:
            self.tokenizer = load_tokenizer(self.train_loader.tokenizer)
            self.model_config = model_config_for(self.model, self.tokenizer)
            self.model_section = dict(self.model)
        tokenizer_dir = str(self.tokenizer.path)
        self.train_loader = dataclasses.replace(self.train_loader, tokenizer=tokenizer_dir)
        if self.eval_loader is not None:
            given = self.eval_loader.tokenizer
            if given is not None and load_tokenizer(given).path.resolve() != self.tokenizer.path.resolve():
                raise ConfigError(
                    "eval_loader.tokenizer",
                    f"{given} is not the training tokenizer {tokenizer_dir}; evaluation reads with the "
                    "model's tokenizer, so drop the key or name the same directory",
                )
            self.eval_loader = dataclasses.replace(self.eval_loader, tokenizer=tokenizer_dir)

    def check_world_size(self, world_size: int) -> None:
        """What depends on how many processes train: every rank gets whole microbatches."""
        if self.global_batch_rows % world_size:
            raise ConfigError(
                "global_batch_rows", f"{self.global_batch_rows} rows cannot be split evenly over {world_size} processes"
            )
        per_device = self.global_batch_rows // world_size
        if per_device % self.device_microbatch_rows:
            raise ConfigError(
                "device_microbatch_rows",
                f"{self.device_microbatch_rows} does not divide the "
                f"{per_device} rows each of the {world_size} processes gets per step",
            )
        if self.fsdp_config is not None:
            self.fsdp_config.check_world_size("fsdp_config", world_size)


def as_recorded(resolved: dict, config: TrainConfig) -> dict:
    """The recipe as config.json records it: with the seeds the training loader draws with, derived
    or given, so that a run can be repeated on the same data; and with the model section and the
    tokenizer a continued run took from its source, so that its checkpoints export without it."""
    train_loader = config.train_loader
    loader = {**resolved.get("train_loader", {}), "tokenizer": train_loader.tokenizer}
    # Without the streams left out with null: the data order numbers the run's streams in this order.
    loader["streams"] = {name: loader["streams"][name] for name in train_loader.streams}
    loader["shuffle_seed"] = train_loader.shuffle_seed
    if not config.model_config.causal:  # (a causal model's loader masks nothing)
        loader["masking"] = {**loader.get("masking", {}), "seed": train_loader.masking.seed}
    recorded = {**resolved, "model": config.model_section, "train_loader": loader}
    if config.eval_loader is not None:
        recorded["eval_loader"] = {**resolved.get("eval_loader", {}), "tokenizer": config.eval_loader.tokenizer}
    return recorded


def build_trainer(config: TrainConfig, resolved: dict) -> Trainer:
    """Everything but ``fit``; ``resolved`` is the plain config written into the run folder."""
    precision = resolve_precision(config.precision)
    # The process group must exist before the loaders: they coordinate streaming's shared memory
    # across the ranks of a node. (The trainer would otherwise create it later, the same way.)
    dist.initialize_dist(get_device(None), timeout=config.dist_timeout)
    world = dist.get_world_size()
    # A save_folder in object storage: flexbert picks the checkpoint to resume from (Composer's remote
    # autoresume reads a stale local copy), and the run overwrites what an upload cut short left.
    remote_save = is_remote(config.checkpoint_folder)
    resume_from = None
    if remote_save:
        recorded = as_recorded(resolved, config)
        resume_from = check_on_rank_zero(
            lambda: prepare_remote_save_folder(config.checkpoint_folder, config.autoresume, recorded)
        )
    elif config.autoresume:
        prepare_autoresume(config.checkpoint_folder)
    reproducibility.seed_all(config.seed)
    model_config = config.model_config
    tokenizer = config.tokenizer
    model = FlexBertForMaskedLM(model_config)
    parallelism = None
    if config.fsdp_config is not None:
        parallelism = {"fsdp": composer_fsdp2_config(config.fsdp_config, torch.distributed.get_backend())}
        mark_sharding_units(model, model.model.layers)
    if config.init_from is not None:
        initialise_weights(model, config.init_from, tokenizer)
    load_path = config.load_path if resume_from is None else resume_from
    if load_path is not None and not is_remote(load_path):
        check_on_rank_zero(lambda: check_checkpoint_matches(load_path, model))
        if config.load_weights_only:
            # Loaded here, into the unwrapped model, from one file or from FSDP shards alike, for a
            # run with DDP, FSDP or neither (Composer itself loads shards only into FSDP). Memory-
            # mapped: no rank reads the checkpoint's optimizer state.
            load_weights(model, load_path)
            load_path = None

    schedule = BatchSizeSchedule(
        config.global_batch_rows,
        config.device_microbatch_rows,
        world,
        config.train_loader.max_seq_len,
        config.batch_warmup,
    )
    train_loader = PackedMLMLoader(
        config.train_loader,
        tokenizer,
        model_config.vocab_size,
        batch_rows=schedule,
        objective=model_config.objective,
        phase_rows=phase_rows(config.max_duration, schedule) if config.train_loader.masking.scheduled else None,
    )
    evaluators = []
    if config.eval_loader is not None:
        eval_rows = config.eval_loader.rows_per_batch or config.device_microbatch_rows
        eval_loader = PackedMLMLoader(
            config.eval_loader,
            tokenizer,
            model_config.vocab_size,
            path="eval_loader",
            batch_rows=eval_rows,
            objective=model_config.objective,
        )
        evaluators.append(
            Evaluator(
                label="eval",
                dataloader=data_spec(eval_loader, restart_each_pass=True),
                metric_names=["MaskedAccuracy", "LanguageCrossEntropy", "LanguagePerplexity"],
                device_eval_microbatch_size=eval_rows,
            )
        )

    run_dir = config.run_dir
    sigterm = SigtermCheckpoint(config.save_interval)
    nan_guard = NanGuard(config.nan_guard, packed_pieces(list(config.train_loader.streams)), run_dir.path)
    callbacks = [
        *build_monitors(config.logging, model_config),
        LoaderMonitor(train_loader),
        LoaderCheckpoint(train_loader),
        sigterm,
        nan_guard,
    ]
    if config.data_order.record:
        callbacks.append(DataOrderRecord(run_dir.path, config.train_loader.masking.seed))
    if config.hf_export is not None:
        folder = Path(config.hf_export.folder) if config.hf_export.folder else run_dir.hf
        callbacks.append(HFExport(config.hf_export, folder, config.train_loader.tokenizer, model_config))
    trainer = Trainer(
        **shared_trainer_arguments(config, model, as_recorded(resolved, config), precision),
        model=ComposerMLM(model),
        train_dataloader=data_spec(train_loader),
        max_duration=config.max_duration.replace("_", ""),
        eval_dataloader=evaluators or None,
        eval_subset_num_batches=config.eval_subset_num_batches,
        device_train_microbatch_size=config.device_microbatch_rows,
        accumulate_train_batch_on_tokens=True,
        spin_dataloaders=False,  # the loader resumes itself; never replay batches
        callbacks=callbacks,
        save_folder=config.checkpoint_folder,
        save_interval=sigterm.save_interval(),
        save_num_checkpoints_to_keep=config.save_num_checkpoints_to_keep,
        save_overwrite=remote_save,
        autoresume=config.autoresume and not remote_save,
        load_path=load_path,
        load_weights_only=config.load_weights_only and resume_from is None,
        dist_timeout=config.dist_timeout,
        parallelism_config=parallelism,
        compile_config={} if config.compile else None,
    )
    if config.fsdp_config is not None and torch.distributed.get_backend() == "gloo":
        average_gradients_over_gloo(trainer.state.model)
    if remote_save:
        trainer.state.callbacks.append(RemoteCheckpointStaging(trainer.state.callbacks))
    return trainer
