"""Autoresume and the callbacks that make a run survive interruption, built on the checkpoint format
of :mod:`flexbert.core.checkpoint`.

* **Autoresume**: the choice of the newest intact checkpoint (see :func:`choose_resume_checkpoint`),
  made by rank 0 before the trainer is built.
* **Surviving interruption**: the loader's state in every checkpoint, and a save on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler

from flexbert.core.checkpoint import CHECKPOINT_NAME, LATEST_LINK, checkpoint_problem, is_remote
from flexbert.data.loader import PackedMLMLoader
from flexbert.typed_config import ConfigError

# --- autoresume -------------------------------------------------------------------------------------


def _checkpoints_newest_first(folder: Path) -> list[Path]:
    found = [
        (int(match[2]), path)
        for path in folder.iterdir()
        if (match := CHECKPOINT_NAME.fullmatch(path.name)) and path.is_file() and not path.is_symlink()
    ]
    return [path for _, path in sorted(found, reverse=True)]


def choose_resume_checkpoint(folder: Path) -> Path | None:
    """Rank 0's part of autoresume: set aside damaged newest checkpoints, point the latest link at the
    newest intact one and return it; None for a folder without checkpoints (a fresh start).

    Composer's autoresume loads whatever ``latest-rank0.pt`` points to. A run killed while writing a
    checkpoint, or a disk that damaged one, would then crash the resumed run at load time; a run
    killed between writing a checkpoint and pointing the link at it would restart from scratch and
    then refuse the folder's newer files. So a damaged newest file is moved aside to
    ``<name>.corrupt`` with a warning naming it, and so on back to the newest intact one. A folder
    whose every checkpoint is damaged raises, leaving them in place: starting over would silently
    throw the run away. Only local folders of whole-file checkpoints are checked; a remote
    ``save_folder`` or sharded (FSDP) checkpoints are left to Composer."""
    link = folder / LATEST_LINK
    if link.is_symlink() and link.resolve().is_dir():
        return None  # sharded checkpoints
    candidates = _checkpoints_newest_first(folder) if folder.is_dir() else []
    if not candidates:
        return None
    problems = {}
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            break
        problems[path] = problem
    else:
        tried = "; ".join(f"{path.name} is {problem}" for path, problem in problems.items())
        raise ConfigError(
            "autoresume",
            f"no intact checkpoint to resume from in {folder}: {tried}. Repair or move "
            "them away to start over, or set load_path to another checkpoint",
        )
    chosen = path
    for damaged, problem in problems.items():
        os.replace(damaged, damaged.with_name(damaged.name + ".corrupt"))
        warnings.warn(
            f"autoresume: checkpoint {damaged} is {problem}; moved it to {damaged.name}.corrupt, "
            f"resuming from {chosen.name}"
        )
    if not (link.is_symlink() and os.readlink(link) == chosen.name):
        if link.is_symlink() and not problems:
            warnings.warn(
                f"autoresume: {link} points at {os.readlink(link)}, but the newer {chosen} is intact "
                "(a run killed before it updated the link?); resuming from the newer one"
            )
        temporary = folder / f".{LATEST_LINK}.tmp"
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(chosen.name)
        os.replace(temporary, link)  # atomic: a kill now leaves the old link or the new one
    return chosen


def prepare_autoresume(save_folder: str) -> None:
    """On every rank, before the trainer is built: rank 0 chooses, the others wait for it."""
    if not is_remote(save_folder):
        check_on_rank_zero(lambda: choose_resume_checkpoint(Path(save_folder)))


def check_on_rank_zero(check: Callable[[], object]) -> None:
    """Run ``check`` on rank 0 alone, and raise the ConfigError it raised on every rank: a check only
    rank 0 makes must not leave the other ranks waiting for it until the timeout."""
    error = None
    if dist.get_global_rank() == 0:
        try:
            check()
        except ConfigError as err:
            error = err
    if dist.get_world_size() > 1:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise error


# --- surviving interruption -------------------------------------------------------------------------


class LoaderCheckpoint(Callback):
    """Puts the packed loader's resume state into every checkpoint and restores it on load, so a
    resumed run continues with exactly the next batch instead of replaying the dataset.

    The state goes in as one JSON string. Its shape depends on the world size (a list of ranks), and
    a sharded checkpoint is read back into the shape of the state the loading run would save: the
    ranks past its own world size would be left behind, silently, on fewer processes."""

    def __init__(self, loader: PackedMLMLoader):
        self.loader = loader

    def state_dict(self) -> dict:
        return {"loader": json.dumps(self.loader.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        loader = state["loader"]
        # Checkpoints written before the state was a string hold it as a dict.
        self.loader.load_state_dict(json.loads(loader) if isinstance(loader, str) else loader)


class _StopVote:
    """One rank agreement on whether to stop, launched without waiting: an all-reduce (MAX) of each
    rank's flag whose result is read a few batches later, when it has long finished.

    On a GPU the result goes to pinned host memory behind a CUDA event, so reading it waits for that
    event only, never for the batches queued since; on gloo the collective itself runs apart."""

    def __init__(self, requested: bool):
        on_gpu = torch.distributed.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        # torch.full launches a kernel; building the flag on the host and copying it would block.
        self._flag = torch.full((1,), int(requested), dtype=torch.int32, device=device)
        self._work = torch.distributed.all_reduce(self._flag, op=torch.distributed.ReduceOp.MAX, async_op=True)
        self._done: torch.cuda.Event | None = None
        if on_gpu:
            self._work.wait()  # orders the current stream after the collective; the host goes on
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(self._flag, non_blocking=True)
            self._flag = host
            self._done = torch.cuda.Event()
            self._done.record()

    def result(self) -> bool:
        if self._done is not None:
            self._done.synchronize()
        else:
            self._work.wait()
        return bool(self._flag.item())


class SigtermCheckpoint(Callback):
    """On SIGTERM (preemption, ``scancel``), finish the current batch, save a checkpoint, exit 0.

    Under several processes, ranks may see the signal at different batches, and all must stop at the
    same one. Each batch launches a vote without waiting for it, and each rank reads the vote launched
    ``VOTE_LAG`` batches earlier: so all ranks stop at one batch, at most ``VOTE_LAG`` batches after
    the signal, and no step waits on the device or the network for the vote."""

    VOTE_LAG = 2

    def __init__(self, save_interval: str):
        self.requested = False
        self._stopping = False
        self._votes: deque[_StopVote] = deque()
        self._periodic = create_interval_scheduler(save_interval.replace("_", ""))
        self._previous_handler = None

    def save_interval(self) -> Callable[[State, Event], bool]:
        """The trainer's checkpoint schedule: periodic, at the end, and right after a SIGTERM."""

        def should_save(state: State, event: Event) -> bool:
            return self._stopping or self._periodic(state, event)

        return should_save

    def _on_sigterm(self, signum, frame) -> None:
        self.requested = True

    def fit_start(self, state: State, logger: Logger) -> None:
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def batch_end(self, state: State, logger: Logger) -> None:
        if dist.get_world_size() == 1:
            self._stopping = self.requested
        else:
            # Every rank launches and reads the same votes in the same order, whatever it has seen.
            self._votes.append(_StopVote(self.requested))
            if len(self._votes) > self.VOTE_LAG:
                self._stopping = self._votes.popleft().result()
        if self._stopping:
            # Ends the loop after this batch; the checkpoint saver then sees should_save() true.
            state.stop_training()

    def fit_end(self, state: State, logger: Logger) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
