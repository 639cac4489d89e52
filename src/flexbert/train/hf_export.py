"""Writing a Hugging Face ModernBERT directory while training runs."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler

from flexbert.core.hf import export_hf, export_notes, hf_config_from_flexbert
from flexbert.core.model import FlexBertConfig
from flexbert.train.schedulers import parse_time
from flexbert.train.step import flexbert_module, full_weights


@dataclass
class HFExportConfig:
    """``hf_export:`` every ``interval`` and at the end, write ``folder/ba<N>``, loadable with
    ``transformers.AutoModelForMaskedLM.from_pretrained``."""

    interval: str = "1000ba"
    folder: str | None = None  # default: <run folder>/hf

    def validate(self, path: str) -> None:
        parse_time(self.interval, f"{path}.interval")


class HFExport(Callback):
    """Exports from rank 0 while the other ranks wait at a barrier, so that no rank runs ahead of
    an export (or times out behind it). Works on the model inside any DDP, compile or FSDP wrapping."""

    def __init__(self, config: HFExportConfig, folder: Path, tokenizer_dir: str, model_config: FlexBertConfig):
        hf_config_from_flexbert(model_config)  # refuse an unexportable architecture before training
        if dist.get_global_rank() == 0:
            for note in export_notes(model_config):
                warnings.warn(f"hf_export: {note}")
        self.folder = folder
        self.tokenizer_dir = tokenizer_dir
        self._due = create_interval_scheduler(
            config.interval.replace("_", ""), include_end_of_training=False, checkpoint_events=False
        )
        self._last_exported: int | None = None

    def _export(self, state: State) -> None:
        batch = int(state.timestamp.batch)
        if batch == self._last_exported:
            return
        weights = full_weights(state.model)  # gathers the shards under FSDP: every rank takes part
        if dist.get_global_rank() == 0:
            export_hf(
                flexbert_module(state.model),
                self.folder / f"ba{batch}",
                tokenizer_dir=self.tokenizer_dir,
                overwrite=True,
                weights=weights,
            )
        dist.barrier()
        self._last_exported = batch

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._due(state, Event.BATCH_END):
            self._export(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._export(state)
