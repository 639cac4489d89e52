"""Autoresume and the callbacks that make a run survive interruption, built on the checkpoint format
of :mod:`flexbert.core.checkpoint`.

* **Autoresume**: the choice of the newest intact checkpoint (see :func:`choose_resume_checkpoint`),
  made by rank 0 before the trainer is built.
* **Surviving interruption**: the loader's state in every checkpoint, and a save on SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from composer.callbacks import CheckpointSaver
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist, maybe_create_object_store_from_uri
from composer.utils.file_helpers import parse_uri
from composer.utils.misc import create_interval_scheduler

from flexbert.core.checkpoint import (
    CHECKPOINT_NAME,
    DCP_METADATA,
    LATEST_LINK,
    SAVED_NAME,
    checkpoint_problem,
    is_remote,
)
from flexbert.core.object_storage import RUN_CONFIG_OBJECT, SYMLINK_SUFFIX
from flexbert.data.loader import PackedMLMLoader
from flexbert.typed_config import ConfigError

T = TypeVar("T")

# --- autoresume -------------------------------------------------------------------------------------

# Composer 0.32.1's autoresume has each node's local rank 0 write a signal file into the save folder
# and remove it after a barrier. The file's name is broadcast from rank 0, so every node takes node
# 0's: on a save folder the nodes share, the second node's removal raises FileNotFoundError and
# every multi-node start with autoresume fails. Each node's file gets its node's rank in its name.
_composer_signal_file_name = dist.get_node_signal_file_name


def _node_signal_file_name(rng=None) -> str:
    return f"{_composer_signal_file_name(rng)}_node{dist.get_node_rank()}"


dist.get_node_signal_file_name = _node_signal_file_name


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


# --- a save_folder in object storage ----------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def prepare_remote_save_folder(save_folder: str, autoresume: bool, recorded: dict[str, Any]) -> str | None:
    """Rank 0's part of a run whose ``save_folder`` is a URI (``s3://bucket/prefix``), before the
    trainer is built: the URI of the checkpoint to resume from, or None to start afresh.

    Composer uploads each checkpoint, then, once every one of its objects is in the bucket, the
    pointer ``latest-rank0.pt.symlink`` naming it. So the pointer always names a complete checkpoint,
    and that is the one resumed from; checkpoints newer than it are an upload cut short (by a kill,
    or a node lost), possibly partial, and are named in a warning and replaced when the run saves
    that step again. Composer's own autoresume is not used for remote folders: it downloads the
    checkpoint into a folder named after the URI under the current directory (``./s3:/bucket/...``)
    and, on the next launch, resumes from that stale copy instead of the bucket's newer checkpoint.

    Also refused here in one line, before any training: a folder that cannot be listed or written
    (no such bucket, no credentials), and one holding checkpoints when ``autoresume`` is off (its
    run's checkpoints would be overwritten). The run's resolved recipe is uploaded beside the
    checkpoints as ``config.json``, so that ``export-hf`` and ``average`` know their model."""

    def refuse(message: str) -> ConfigError:
        return ConfigError("save_folder", f"cannot use {save_folder}: {message}")

    try:
        store = maybe_create_object_store_from_uri(save_folder)
    except Exception as err:  # an unknown scheme, a backend's package missing
        raise refuse(_one_line(err)) from None
    prefix = parse_uri(save_folder)[2].strip("/")
    folder = f"{prefix}/" if prefix else ""
    try:
        keys = store.list_objects(folder)
    except Exception as err:  # boto3's errors, and every other backend's
        raise refuse(_one_line(err)) from None
    saved: dict[int, str] = {}  # the step of every checkpoint (a file or a folder of shards) -> its name
    for key in keys:
        name = key.removeprefix(folder).split("/")[0]
        if match := SAVED_NAME.fullmatch(name):
            saved[int(match[2])] = name
    pointer = f"{folder}{LATEST_LINK}{SYMLINK_SUFFIX}"
    resume_from = None
    if saved and not autoresume:
        raise ConfigError(
            "save_folder",
            f"{save_folder} already holds checkpoints ({', '.join(saved[step] for step in sorted(saved))}); "
            "set autoresume: true to continue that run, or give another save_folder",
        )
    with tempfile.TemporaryDirectory() as scratch:
        if autoresume and pointer in keys:
            try:
                store.download_object(pointer, f"{scratch}/pointer")
            except Exception as err:
                raise refuse(f"cannot read {pointer}: {_one_line(err)}") from None
            target = Path(f"{scratch}/pointer").read_text().strip().strip("/")
            name = target.removeprefix(folder)
            match = SAVED_NAME.fullmatch(name)
            if match is None or not (target in keys or f"{target}/{DCP_METADATA}" in keys):
                raise ConfigError(
                    "autoresume",
                    f"{store.get_uri(pointer)} points at {target}, which is not a checkpoint in {save_folder}; "
                    "remove the pointer to start over, or set load_path to another checkpoint",
                )
            resume_from = store.get_uri(target)
            step = int(match[2])
            for newer in sorted(later for later in saved if later > step):
                warnings.warn(
                    f"autoresume: {save_folder.rstrip('/')}/{saved[newer]} is newer than {name}, the checkpoint "
                    f"{LATEST_LINK} points at (an upload cut short?); resuming from {name}, and replacing it "
                    "when the run saves that step again"
                )
        elif saved:  # a run killed before its first checkpoint's upload completed
            warnings.warn(
                f"autoresume: {save_folder} holds {', '.join(saved.values())} but no {LATEST_LINK} pointer "
                "(uploads cut short before any completed?); starting afresh, replacing them"
            )
        config_file = Path(scratch) / RUN_CONFIG_OBJECT
        config_file.write_text(json.dumps(recorded, indent=2, default=str))
        try:
            store.upload_object(f"{folder}{RUN_CONFIG_OBJECT}", str(config_file))
        except Exception as err:
            raise refuse(f"cannot write {RUN_CONFIG_OBJECT} there: {_one_line(err)}") from None
    return resume_from


class RemoteCheckpointStaging(Callback):
    """Removes, once the run is closed and every upload done, the local copies Composer keeps of the
    checkpoints it uploads (``save_num_checkpoints_to_keep`` of them, in a folder it makes with
    ``tempfile.mkdtemp`` and never removes).

    Composer also polls the bucket for a checkpoint's objects every 30 s before it uploads the pointer
    to it, so a run's end waited up to 30 s past its last upload: the poll is made every
    :data:`POINTER_POLL_SECONDS` instead."""

    POINTER_POLL_SECONDS = 2.0

    def __init__(self, callbacks: list[Callback]):
        self.saver = next((callback for callback in callbacks if isinstance(callback, CheckpointSaver)), None)
        if self.saver is not None and hasattr(self.saver, "_symlink_upload_wait_before_next_try_in_seconds"):
            self.saver._symlink_upload_wait_before_next_try_in_seconds = self.POINTER_POLL_SECONDS

    def post_close(self) -> None:
        if self.saver is None or self.saver.remote_uploader is None:
            return
        # The saver's folder is mkdtemp()/<the URI's path>; the whole mkdtemp() folder goes.
        staging = Path(self.saver.folder)
        temporary = Path(tempfile.gettempdir())
        if temporary in staging.parents:
            shutil.rmtree(temporary / staging.relative_to(temporary).parts[0], ignore_errors=True)


def check_on_rank_zero(check: Callable[[], T]) -> T:
    """Run ``check`` on rank 0 alone, and raise the ConfigError it raised on every rank, or return what
    it returned on every rank: a check only rank 0 makes must not leave the other ranks waiting for it
    until the timeout."""
    error = result = None
    if dist.get_global_rank() == 0:
        try:
            result = check()
        except ConfigError as err:
            error = err
    if dist.get_world_size() > 1:
        shared = [error, result]
        dist.broadcast_object_list(shared, src=0)
        error, result = shared
    if error is not None:
        raise error
    return result


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
