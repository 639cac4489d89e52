"""Callbacks that make a run survive interruption: loader state in checkpoints, SIGTERM saves."""

from __future__ import annotations

import signal
from collections.abc import Callable

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler

from flexbert.data.loader import PackedMLMLoader


class LoaderCheckpoint(Callback):
    """Puts the packed loader's resume state into every checkpoint and restores it on load, so a
    resumed run continues with exactly the next batch instead of replaying the dataset."""

    def __init__(self, loader: PackedMLMLoader):
        self.loader = loader

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])


class SigtermCheckpoint(Callback):
    """On SIGTERM (preemption, ``scancel``), finish the current batch, save a checkpoint, exit 0."""

    def __init__(self, save_interval: str):
        self.requested = False
        self._periodic = create_interval_scheduler(save_interval.replace("_", ""))
        self._previous_handler = None

    def save_interval(self) -> Callable[[State, Event], bool]:
        """The trainer's checkpoint schedule: periodic, at the end, and right after a SIGTERM."""

        def should_save(state: State, event: Event) -> bool:
            return self.requested or self._periodic(state, event)

        return should_save

    def _on_sigterm(self, signum, frame) -> None:
        self.requested = True

    def fit_start(self, state: State, logger: Logger) -> None:
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def batch_end(self, state: State, logger: Logger) -> None:
        if dist.get_world_size() > 1:
            # Ranks may see the signal at different batches; all must stop at the same one.
            flag = state.device.tensor_to_device(torch.tensor([int(self.requested)]))
            dist.all_reduce(flag, reduce_operation="MAX")
            self.requested = bool(flag.item())
        if self.requested:
            # Ends the loop after this batch; the checkpoint saver then sees should_save() true.
            state.stop_training()

    def fit_end(self, state: State, logger: Logger) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
