"""The NaN guard: a step whose loss or gradient is NaN or infinite never updates the weights.

Every step is checked after its last backward pass and before the optimizer step. Such a step
stops the run (``nan_guard: {action: stop}``, the default) or has its optimizer step skipped
(``action: skip``); either way the message names the step (numbered as in ``metrics.jsonl``) and
the samples of its batch, and ``RUN_DIR/nan_guard.jsonl`` records every piece of it.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from composer.core import Callback, Precision, State
from composer.loggers import Logger
from composer.utils import dist
from torch.distributed.tensor import DTensor

from flexbert.core.checkpoint import RunDir
from flexbert.errors import FlexBertError

SAMPLES_NAMED = 24  # in the message; the file holds them all


@dataclass
class NanGuardConfig:
    """The ``nan_guard:`` section of a recipe."""

    action: Literal["stop", "skip"] = "stop"  # skip: drop that step's update and train on


class NonFiniteTrainingError(FlexBertError, RuntimeError):
    """A step's loss or gradient was NaN or infinite under ``nan_guard.action: stop``."""


def _loss_tensors(loss) -> list[torch.Tensor]:
    if isinstance(loss, dict):
        return list(loss.values())
    return list(loss) if isinstance(loss, (list, tuple)) else [loss]


@dataclass(frozen=True)
class BatchContents:
    """How the guard names what a batch held: ``key`` of the record's entry, ``of_batch`` the host
    values that identify one rank's batch, ``describe`` the message's account of all ranks' ones."""

    key: str
    of_batch: Callable[[dict], list]
    describe: Callable[[list[list]], str]


def packed_pieces(stream_names: Sequence[str]) -> BatchContents:
    """A pretraining batch: its pieces (stream, sample, start, end), named by dataset index and stream."""
    return BatchContents(
        "pieces", lambda batch: batch["piece_keys"].tolist(), lambda per_rank: describe_samples(per_rank, stream_names)
    )


def labelled_examples(split_path: str) -> BatchContents:
    """A fine-tuning batch: its examples, by their index in the training split."""

    def describe(per_rank: list[list[int]]) -> str:
        examples = [index for indices in per_rank for index in indices]
        named = ", ".join(map(str, examples[:SAMPLES_NAMED]))
        more = f" and {len(examples) - SAMPLES_NAMED} more" if len(examples) > SAMPLES_NAMED else ""
        return f"{len(examples)} examples of {split_path} (index in the split): {named}{more}"

    return BatchContents("examples", lambda batch: batch["example_ids"].tolist(), describe)


def describe_samples(pieces_per_rank: Sequence[Sequence[Sequence[int]]], stream_names: Sequence[str]) -> str:
    """``3 samples (dataset index and stream): 12 (web), 13 (web), 260 (code)``: each document once,
    in batch order."""
    samples = list(dict.fromkeys((stream, sample) for pieces in pieces_per_rank for stream, sample, *_ in pieces))
    named = ", ".join(f"{sample} ({stream_names[stream]})" for stream, sample in samples[:SAMPLES_NAMED])
    more = f" and {len(samples) - SAMPLES_NAMED} more" if len(samples) > SAMPLES_NAMED else ""
    return f"{len(samples)} samples (dataset index and stream): {named}{more}"


class NanGuard(Callback):
    """Checks each step's loss and gradient for NaN and Inf at the cost of one host sync per step.

    The losses of the step's microbatches are checked on the device as they come (no sync); after
    the last backward pass (``AFTER_TRAIN_BATCH``, which Composer runs before the optimizer step) the
    gradients' largest magnitude, which is NaN or Inf if any entry is, joins them in one small tensor,
    maxed over ranks so that all agree, and read once. A skipped step sets every gradient to None:
    torch optimizers then leave those parameters and their state alone (unlike zero gradients, with
    which AdamW would still decay the weights and move its moments). Under amp_fp16, overflowing
    gradients are the loss scaler's business, so only the loss is checked.
    """

    def __init__(self, config: NanGuardConfig, contents: BatchContents, run_dir: str | Path):
        self.action = config.action
        self.contents = contents
        self.record = RunDir(Path(run_dir)).nan_guard_file
        self.skipped_steps = 0
        self._loss_finite: torch.Tensor | None = None

    def before_train_batch(self, state: State, logger: Logger) -> None:
        self._loss_finite = None

    def after_loss(self, state: State, logger: Logger) -> None:
        finite = torch.stack([torch.isfinite(loss.detach()).all() for loss in _loss_tensors(state.loss)]).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def after_train_batch(self, state: State, logger: Logger) -> None:
        loss_bad, grad_bad = self._non_finite(state)
        if not (loss_bad or grad_bad):
            return
        step = state.timestamp.batch.value
        problem = "loss" if not grad_bad else "gradient" if not loss_bad else "loss and gradient"
        per_rank = dist.all_gather_object(self.contents.of_batch(state.batch))
        if dist.get_global_rank() == 0:
            entry = {"step": step, "problem": problem, "action": self.action, f"{self.contents.key}_per_rank": per_rank}
            with self.record.open("a", encoding="utf-8") as file:
                file.write(json.dumps(entry) + "\n")
        message = (
            f"nan_guard: step {step} has a NaN or infinite {problem}; its batch held "
            f"{self.contents.describe(per_rank)} (all of them in {self.record})"
        )
        if self.action == "stop":
            raise NonFiniteTrainingError(
                f"{message}; stopped before the optimizer step (nan_guard.action: skip would skip such steps)"
            )
        for param in state.model.parameters():
            param.grad = None
        self.skipped_steps += 1
        warnings.warn(f"{message}; skipped its optimizer step", RuntimeWarning)
        logger.log_metrics({"nan_guard/skipped_steps": self.skipped_steps})

    def _non_finite(self, state: State) -> tuple[bool, bool]:
        """(loss, gradient) non-finite on any rank; the only host sync."""
        # Made on the device: copying a host constant there could wait for the queued work.
        false = torch.zeros((), dtype=torch.bool, device=next(state.model.parameters()).device)
        loss_bad = false if self._loss_finite is None else ~self._loss_finite
        grad_bad = false
        if state.precision != Precision.AMP_FP16:
            # This rank's part of each gradient (its shard under FSDP): the all-reduce below covers the rest.
            grads = [
                p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                for p in state.model.parameters()
                if p.grad is not None
            ]
            if grads:
                grad_bad = ~torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf))
        flags = torch.stack([loss_bad, grad_bad]).float()
        if dist.get_world_size() > 1:
            dist.all_reduce(flags, reduce_operation="MAX")
        loss_bad, grad_bad = flags.tolist()
        return bool(loss_bad), bool(grad_bad)
