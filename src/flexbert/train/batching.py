"""How Composer sees packed batches: counting, microbatch splitting, and batch-size warmup."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from composer.core import DataSpec, Time

from flexbert.data.loader import PackedMLMLoader, RankState
from flexbert.data.packing import PackedBatch
from flexbert.typed_config import ConfigError


def parse_time(value: str, key_path: str) -> Time:
    """``"3_000_000_000tok"``, ``"100ba"`` ... as a Composer Time."""
    try:
        return Time.from_timestring(value.replace("_", ""))
    except (ValueError, TypeError) as err:
        raise ConfigError(key_path, f"not a duration like '1000ba' or '3_000_000_000tok': {value!r} ({err})") from None


@dataclass
class BatchWarmupConfig:
    """The global batch grows linearly from ``start_rows`` to ``global_batch_rows`` over ``duration``
    tokens of row capacity (ModernBERT-base: 768 -> 4608 sequences over 50B tokens)."""

    start_rows: int
    duration: str


class BatchSizeSchedule:
    """Rows per device batch as a function of the global rows emitted so far."""

    def __init__(self, global_rows: int, microbatch_rows: int, world_size: int, row_tokens: int,
                 warmup: BatchWarmupConfig | None):
        self.global_rows = global_rows
        self.microbatch_rows = microbatch_rows
        self.world_size = world_size
        self.row_tokens = row_tokens
        self.warmup = warmup
        self.warmup_tokens = parse_time(warmup.duration, "batch_warmup.duration").value if warmup else 0

    def global_rows_at(self, rows_so_far: int) -> int:
        if not self.warmup or self.warmup_tokens == 0:
            return self.global_rows
        progress = min(1.0, rows_so_far * self.row_tokens / self.warmup_tokens)
        return round(self.warmup.start_rows + (self.global_rows - self.warmup.start_rows) * progress)

    def __call__(self, rows_so_far: int) -> int:
        # Whole microbatches on every rank, so no rank idles and microbatches stay full.
        step = self.microbatch_rows * self.world_size
        return max(1, self.global_rows_at(rows_so_far) // step) * self.microbatch_rows


def split_rows(batch: dict, microbatch_rows: int) -> list[dict]:
    """Contiguous groups of ``microbatch_rows`` rows; each is a self-contained unpadded batch.

    Composer calls this on the batch after moving it to the device: every offset comes from the
    batch's host arrays, and the device tensors are only sliced (see :class:`PackedBatch`)."""
    if batch["num_rows"] <= microbatch_rows:
        return [batch]
    packed = PackedBatch(**batch)
    return [packed.select_rows(first, min(first + microbatch_rows, packed.num_rows)).as_dict()
            for first in range(0, packed.num_rows, microbatch_rows)]


def count_tokens(batch: dict) -> dict[str, int]:
    """Real tokens advance the clock; masked tokens weigh gradient accumulation. Both are tensor
    shapes, which the host knows without asking the device."""
    return {"total": batch["input_ids"].shape[0], "loss_generating": batch["masked_index"].shape[0]}


class ComposerBatches:
    """The packed loader as an iterable of dict batches, which Composer knows how to move to the
    device. An eval loader restarts from its beginning at every evaluation."""

    def __init__(self, loader: PackedMLMLoader, restart_each_pass: bool):
        self.loader = loader
        self.restart_each_pass = restart_each_pass

    def __iter__(self) -> Iterator[dict]:
        if self.restart_each_pass:
            self.loader.state = RankState()
        # Page-locked host memory makes Composer's non_blocking copy to the GPU truly asynchronous.
        pin = torch.cuda.is_available()
        for batch in self.loader:
            yield {key: value.pin_memory() if pin and torch.is_tensor(value) else value
                   for key, value in batch.as_dict().items()}


def data_spec(loader: PackedMLMLoader, restart_each_pass: bool = False) -> DataSpec:
    return DataSpec(
        ComposerBatches(loader, restart_each_pass),
        get_num_samples_in_batch=lambda batch: batch["num_rows"],
        get_num_tokens_in_batch=count_tokens,
        split_batch=split_rows,
    )

