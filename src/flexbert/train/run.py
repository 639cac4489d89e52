"""Assembling and running a Composer Trainer from a validated TrainConfig."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from composer import Evaluator, Trainer
from composer.utils import dist, get_device, reproducibility

from flexbert.data.loader import PackedMLMLoader
from flexbert.model import FlexBertForMaskedLM
from flexbert.train.batching import BatchSizeSchedule, data_spec
from flexbert.train.checkpoint import load_weights, weight_shapes
from flexbert.train.composer_model import ComposerMLM
from flexbert.train.config import TrainConfig
from flexbert.train.hf_export import HFExport
from flexbert.train.lifecycle import LoaderCheckpoint, SigtermCheckpoint
from flexbert.train.loggers import build_callbacks, build_loggers
from flexbert.train.nan_guard import NanGuard
from flexbert.train.optimizers import build_optimizer
from flexbert.train.resume import check_on_rank_zero, prepare_autoresume
from flexbert.train.sample_ids import SampleIdLog
from flexbert.train.schedulers import build_scheduler
from flexbert.train.sharding import average_gradients_over_gloo, composer_fsdp2_config, mark_sharding_units
from flexbert.typed_config import ConfigError


def check_checkpoint_matches(path: str, model: torch.nn.Module) -> None:
    """Refuse, with the first differences named, a checkpoint saved from another architecture."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    try:
        found = weight_shapes(path)
    except Exception as err:  # a truncated file fails in many ways inside torch.load
        raise ConfigError("load_path", f"{path} is not a readable Composer checkpoint ({err})") from None
    problems = [f"{name}: checkpoint {found[name]} vs model {shape}" for name, shape in expected.items()
                if name in found and found[name] != shape]
    problems += [f"{name}: missing from the checkpoint" for name in expected if name not in found]
    problems += [f"{name}: not in this model" for name in found if name not in expected]
    if problems:
        listed = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ConfigError("load_path", f"{path} was saved from a different architecture: {listed}")


def resolve_precision(requested: str) -> str:
    """``auto`` is amp_bf16 on a GPU and fp32 elsewhere; mixed precision without a GPU is refused in
    one line (Composer would fail with a traceback when the trainer is built)."""
    if requested == "auto":
        return "amp_bf16" if torch.cuda.is_available() else "fp32"
    if requested != "fp32" and not torch.cuda.is_available():
        raise ConfigError("precision", f"{requested} needs a GPU, and this machine has none; use fp32 or auto")
    return requested


def build_trainer(config: TrainConfig, resolved: dict) -> Trainer:
    """Everything but ``fit``; ``resolved`` is the plain config written into the run folder."""
    precision = resolve_precision(config.precision)
    # The process group must exist before the loaders: they coordinate streaming's shared memory
    # across the ranks of a node. (The trainer would otherwise create it later, the same way.)
    dist.initialize_dist(get_device(None), timeout=config.dist_timeout)
    world = dist.get_world_size()
    if config.autoresume:
        prepare_autoresume(config.checkpoint_folder)
    reproducibility.seed_all(config.seed)
    model_config = config.model_config
    tokenizer = config.tokenizer
    model = FlexBertForMaskedLM(model_config)
    parallelism = None
    if config.fsdp_config is not None:
        parallelism = {"fsdp": composer_fsdp2_config(config.fsdp_config, torch.distributed.get_backend())}
        mark_sharding_units(model, model.model.layers)
    load_path = config.load_path
    if load_path is not None and "://" not in load_path:
        check_on_rank_zero(lambda: check_checkpoint_matches(load_path, model))
        if config.load_weights_only:
            # Loaded here, into the unwrapped model, from one file or from FSDP shards alike, for a
            # run with DDP, FSDP or neither (Composer itself loads shards only into FSDP). Memory-
            # mapped: no rank reads the checkpoint's optimizer state.
            load_weights(model, load_path)
            load_path = None

    schedule = BatchSizeSchedule(config.global_batch_rows, config.device_microbatch_rows, world,
                                 config.train_loader.max_seq_len, config.batch_warmup)
    train_loader = PackedMLMLoader(config.train_loader, tokenizer, model_config.vocab_size, batch_rows=schedule)
    evaluators = []
    if config.eval_loader is not None:
        eval_loader = PackedMLMLoader(config.eval_loader, tokenizer, model_config.vocab_size, path="eval_loader")
        evaluators.append(Evaluator(label="eval", dataloader=data_spec(eval_loader, restart_each_pass=True),
                                    metric_names=["MaskedAccuracy", "LanguageCrossEntropy", "LanguagePerplexity"],
                                    device_eval_microbatch_size=config.eval_loader.rows_per_batch))

    run_dir = config.run_dir
    sigterm = SigtermCheckpoint(config.save_interval)
    nan_guard = NanGuard(config.nan_guard, list(config.train_loader.streams), run_dir)
    callbacks = [*build_callbacks(config.logging, model_config), LoaderCheckpoint(train_loader), sigterm, nan_guard]
    if config.debug.log_sample_ids:
        callbacks.append(SampleIdLog(run_dir))
    if config.hf_export is not None:
        folder = Path(config.hf_export.folder or config.run_dir / "hf")
        callbacks.append(HFExport(config.hf_export, folder, config.train_loader.tokenizer, model_config))
    if dist.get_global_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=2, default=str))
    trainer = Trainer(
        model=ComposerMLM(model),
        run_name=config.run_name,
        train_dataloader=data_spec(train_loader),
        max_duration=config.max_duration.replace("_", ""),
        optimizers=build_optimizer(model, config.optimizer),
        schedulers=build_scheduler(config.scheduler),
        step_schedulers_every_batch=True,
        eval_dataloader=evaluators or None,
        eval_interval=config.eval_interval.replace("_", ""),
        eval_subset_num_batches=config.eval_subset_num_batches,
        device_train_microbatch_size=config.device_microbatch_rows,
        accumulate_train_batch_on_tokens=True,
        spin_dataloaders=False,  # the loader resumes itself; never replay batches
        callbacks=callbacks,
        loggers=build_loggers(config.logging, run_dir, config.run_name),
        progress_bar=config.logging.progress_bar,
        log_to_console=not config.logging.progress_bar,
        save_folder=config.checkpoint_folder,
        save_interval=sigterm.save_interval(),
        save_num_checkpoints_to_keep=config.save_num_checkpoints_to_keep,
        autoresume=config.autoresume,
        load_path=load_path,
        load_weights_only=config.load_weights_only,
        precision=precision,
        seed=config.seed,
        dist_timeout=config.dist_timeout,
        parallelism_config=parallelism,
        compile_config={} if config.compile else None,
    )
    if config.fsdp_config is not None and torch.distributed.get_backend() == "gloo":
        average_gradients_over_gloo(trainer.state.model)
    return trainer
