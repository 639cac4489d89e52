"""One training step, as Composer runs it, and the hooks of this project that it calls, in order.

A step of ``Trainer.fit`` (composer/trainer/trainer.py, ``_train_loop`` and ``_train_batch``):

 1. **Event.BEFORE_DATALOADER**, then ``next()`` on :class:`ComposerBatches`: the packed loader
    (``data/loader.py``) reads documents from the MDS streams (``data/streams.py``), packs them into
    rows and masks them (``data/packing.py``) — all on the host; the tensors are pinned.
 2. Composer moves the batch to the device (``Device.batch_to_device``), then counts it:
    :func:`count_tokens` and ``num_rows``, from tensor shapes and host values only. **AFTER_DATALOADER**,
    **BATCH_START**.
 3. ``split_batch`` = :func:`split_rows`: microbatches of ``device_microbatch_rows`` rows, cut at
    offsets the batch carries on the host. **BEFORE_TRAIN_BATCH**; gradients are zeroed, and the
    microbatches' masked-token counts are summed over ranks to weigh gradient accumulation.
 4. For each microbatch: **BEFORE_FORWARD**, :meth:`ComposerMLM.forward` (the encoder,
    ``model/model.py``, with the chunked MLM loss, ``model/losses.py``), **AFTER_FORWARD**,
    **BEFORE_LOSS**, :meth:`ComposerMLM.loss`, **AFTER_LOSS** (``NanGuard.after_loss`` notes a
    non-finite loss), **BEFORE_BACKWARD**, backward, **AFTER_BACKWARD**.
 5. **AFTER_TRAIN_BATCH**: ``NanGuard.after_train_batch`` agrees over ranks and, if told to skip,
    zeroes the gradients; then ``optimizer.step()`` (``train/optimizers.py``) and the schedulers.
 6. **BATCH_END**: the monitors (``train/monitors.py``: throughput and MFU, packing, gradient norm),
    ``DataOrderRecord``, ``SigtermCheckpoint`` (ranks agree to stop), ``HFExport``, the loggers; then the
    evaluators, and **BATCH_CHECKPOINT**, where Composer saves a checkpoint that holds the loader's
    state (``LoaderCheckpoint`` in ``train/resume.py``).

Also here: batch-size warmup (:class:`BatchSizeSchedule`, which the loader asks for each batch's
rows), the phase's length in rows that a mask-rate schedule runs over (:func:`phase_rows`), and the
helpers that reach the FlexBERT model inside training's wrappers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from composer.core import DataSpec, Time, TimeUnit
from composer.models import ComposerModel
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from flexbert.core.model import FlexBertForMaskedLM, MaskedLMOutput
from flexbert.core.model.losses import IGNORE_INDEX
from flexbert.data.loader import PackedMLMLoader, RankState
from flexbert.data.packing import PackedBatch
from flexbert.train.metrics import MaskedCrossEntropy, MaskedPerplexity, MaskedTokenAccuracy
from flexbert.train.schedulers import parse_time
from flexbert.typed_config import ConfigError


@dataclass
class BatchWarmupConfig:
    """The global batch grows linearly from ``start_rows`` to ``global_batch_rows`` over ``duration``
    tokens of row capacity (ModernBERT-base: 768 -> 4608 sequences over 50B tokens)."""

    start_rows: int
    duration: str

    def validate(self, path: str) -> None:
        parse_time(self.duration, f"{path}.duration")


class BatchSizeSchedule:
    """Rows per device batch as a function of the global rows emitted so far."""

    def __init__(
        self, global_rows: int, microbatch_rows: int, world_size: int, row_tokens: int, warmup: BatchWarmupConfig | None
    ):
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

    def rows_in(self, batches: int) -> int:
        """The global rows of the first ``batches`` batches."""
        rows = 0
        for done in range(batches):
            size = self(rows) * self.world_size
            if self.global_rows_at(rows) == self.global_rows:  # warmed up: every later batch is as large
                return rows + size * (batches - done)
            rows += size
        return rows


# What a phase's length may be given in for a schedule over its progress: epochs depend on the data.
PHASE_UNITS = (TimeUnit.TOKEN, TimeUnit.SAMPLE, TimeUnit.BATCH)


def phase_length(max_duration: str) -> Time:
    """The phase's ``max_duration`` as a length that a mask-rate schedule can run over; one line if
    it is not in tokens, samples (packed rows) or batches."""
    length = parse_time(max_duration, "max_duration")
    if length.unit not in PHASE_UNITS:
        raise ConfigError(
            "max_duration",
            f"train_loader.masking.mlm_probability's schedule runs over the phase, whose length {max_duration!r} "
            "does not give before training; give it in tokens (tok), samples (sp) or batches (ba)",
        )
    return length


def phase_rows(max_duration: str, batches: BatchSizeSchedule) -> float:
    """The phase's length in global rows, the measure batch-size warmup grows over. Composer counts
    a phase in tokens by the real tokens of its batches, which fill a little less than their rows'
    capacity: such a phase reaches its last row of capacity about as far before its end as packing
    leaves rows unfilled (under 1% on real corpora), and a schedule holds its end value there."""
    length = phase_length(max_duration)
    if length.unit == TimeUnit.TOKEN:
        return length.value / batches.row_tokens
    if length.unit == TimeUnit.SAMPLE:
        return length.value
    return batches.rows_in(length.value)


def split_rows(batch: dict, microbatch_rows: int) -> list[dict]:
    """Contiguous groups of ``microbatch_rows`` rows; each is a self-contained unpadded batch.

    Composer calls this on the batch after moving it to the device: every offset comes from the
    batch's host arrays, and the device tensors are only sliced (see :class:`PackedBatch`)."""
    if batch["num_rows"] <= microbatch_rows:
        return [batch]
    packed = PackedBatch(**batch)
    return [
        packed.select_rows(first, min(first + microbatch_rows, packed.num_rows)).as_dict()
        for first in range(0, packed.num_rows, microbatch_rows)
    ]


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
            yield {
                key: value.pin_memory() if pin and torch.is_tensor(value) else value
                for key, value in batch.as_dict().items()
            }


def data_spec(loader: PackedMLMLoader, restart_each_pass: bool = False) -> DataSpec:
    return DataSpec(
        ComposerBatches(loader, restart_each_pass),
        get_num_samples_in_batch=lambda batch: batch["num_rows"],
        get_num_tokens_in_batch=count_tokens,
        split_batch=split_rows,
    )


def flexbert_module(model: torch.nn.Module) -> torch.nn.Module:
    """The FlexBERT model inside what training wraps it in: DistributedDataParallel (``module``),
    torch.compile (``_orig_mod``) and the ComposerModel (``model``). FSDP2 shards a model in place,
    without a wrapper; its parameters are then shards (see :func:`full_weights`)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, ComposerModel):
            model = model.model
        else:
            return model


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's whole state dict, on the CPU. Under FSDP the shards are gathered, a
    collective that every rank must join, and only rank 0 gets them (the others an empty dict)."""
    module = flexbert_module(model)
    if not any(isinstance(p, DTensor) for p in module.parameters()):
        return {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class ComposerMLM(ComposerModel):
    """Batches are the packed loader's dicts; the loss is the mean over masked tokens only.

    Gradient accumulation weighs microbatches by their masked-token counts (the trainer runs with
    ``accumulate_train_batch_on_tokens``), so a step's loss is the mean over every masked token of
    the global batch, whatever the microbatch split or world size.
    """

    def __init__(self, model: FlexBertForMaskedLM):
        super().__init__()
        self.model = model
        self.train_metrics = {"MaskedAccuracy": MaskedTokenAccuracy(ignore_index=IGNORE_INDEX)}
        self.eval_metrics = {
            "MaskedAccuracy": MaskedTokenAccuracy(ignore_index=IGNORE_INDEX),
            "LanguageCrossEntropy": MaskedCrossEntropy(),
            "LanguagePerplexity": MaskedPerplexity(),
        }

    def forward(self, batch: dict[str, Any]) -> MaskedLMOutput:
        # Never whole [masked, vocab] logits: chunked loss in training, per-token losses in evaluation.
        return self.model(
            batch["input_ids"],
            labels=batch["labels"],
            cu_seqlens=batch["cu_seqlens"],
            max_seqlen=batch["max_seqlen"],
            masked_index=batch["masked_index"],
            return_logits=False,
        )

    def loss(self, outputs: MaskedLMOutput, batch: dict[str, Any]) -> torch.Tensor:
        return outputs.loss

    def eval_forward(self, batch: dict[str, Any], outputs: MaskedLMOutput | None = None) -> MaskedLMOutput:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: dict[str, Any], outputs: MaskedLMOutput, metric) -> None:
        if not self.model.config.sparse_prediction:  # whole logits [T, V]
            if isinstance(metric, MaskedCrossEntropy):
                labelled = batch["labels"] != IGNORE_INDEX
                metric.update(
                    F.cross_entropy(outputs.logits.float()[labelled], batch["labels"][labelled], reduction="none")
                )
            else:
                metric.update(outputs.logits, batch["labels"])
            return
        # Outputs exist only at the labelled tokens: their predicted ids, and in evaluation their losses.
        if isinstance(metric, MaskedCrossEntropy):
            metric.update(outputs.token_losses)
        else:
            metric.update(outputs.predictions, batch["labels"][batch["masked_index"]])
