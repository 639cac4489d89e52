"""Everything about this project's checkpoints and run folders, in one place.

* **The run folder** (:class:`RunDir`): ``<run_root>/<run_name>/`` holds ``config.json`` (the resolved
  recipe), ``checkpoints/``, ``metrics.jsonl``, ``plots/``, ``hf/`` and the debugging records.
* **The Composer checkpoint format.** Composer writes a checkpoint as one file (``ep0-ba6-rank0.pt``:
  ``torch.save`` of ``{"state": {"model": {...}, ...}}``) or, under FSDP with ``state_dict_type:
  sharded``, as a folder of torch.distributed.checkpoint (DCP) shards (``ep0-ba6/__0_0.distcp`` ...,
  ``.metadata``), whose keys are the file's flattened with dots (``state.model.<name>``). Either way
  the model's weights are keyed as the ComposerModel names them, ``model.<FlexBERT parameter>``; the
  functions here read and write them under the FlexBERT model's own names.
* **Autoresume**: the choice of the newest intact checkpoint (see :func:`choose_resume_checkpoint`).
* **The callbacks that make a run survive interruption**: the loader's state in every checkpoint,
  and a save on SIGTERM.

Composer checkpoints are pickles. Reading weights here never runs arbitrary code: files are read
with ``torch.load(weights_only=True)``, memory-mapped, allowing only the few plain types Composer's
state holds (:data:`SAFE_CHECKPOINT_GLOBALS`). Composer's own loading (``load_path`` with optimizer
state, autoresume) unpickles everything, so such checkpoints must come from trusted places.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import re
import signal
import uuid
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler

from flexbert.data.loader import PackedMLMLoader
from flexbert.errors import CheckpointError, MissingFileError
from flexbert.model import FlexBertConfig, FlexBertForMaskedLM
from flexbert.typed_config import ConfigError

# The ComposerModel keeps the FlexBERT model as its attribute ``model``.
COMPOSER_MODEL_PREFIX = "model."
SHARDED_MODEL_PREFIX = "state.model." + COMPOSER_MODEL_PREFIX  # a sharded checkpoint's flattened keys
DCP_METADATA = ".metadata"
LATEST_LINK = "latest-rank0.pt"
# Where a checkpoint that import-hf or averaging wrote keeps its model config. Composer reads only the
# "state" (and "rng") entries of a checkpoint file, so this one travels along unread by training.
MODEL_CONFIG_KEY = "flexbert_model_config"
# Composer's default checkpoint name, ep{epoch}-ba{batch}-rank{rank}.pt; rank 0 writes the file.
CHECKPOINT_NAME = re.compile(r"ep(\d+)-ba(\d+)-rank0\.pt")
SAVED_NAME = re.compile(r"ep(\d+)-ba(\d+)(?:-rank0\.pt)?")  # a file, or a folder of shards
try:  # NumPy 2 (how pickles of arrays name the function that rebuilds them)
    from numpy._core.multiarray import _reconstruct as _reconstruct_ndarray
except ImportError:  # NumPy 1
    from numpy.core.multiarray import _reconstruct as _reconstruct_ndarray
# What Composer's saved state holds besides tensors and containers: the run's wall-clock time, the
# torch version, and NumPy RNG states.
SAFE_CHECKPOINT_GLOBALS = [
    datetime.timedelta,
    torch.torch_version.TorchVersion,
    np.dtype,
    np.ndarray,
    _reconstruct_ndarray,
    *{type(np.dtype(code)) for code in ("u1", "u4", "u8", "i4", "i8", "f4", "f8", "b1")},
]


# --- the run folder ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunDir:
    """A run's folder, ``<run_root>/<run_name>``, and the name of everything in it."""

    path: Path

    @classmethod
    def of(cls, run_root: str | os.PathLike, run_name: str) -> RunDir:
        return cls(Path(run_root) / run_name)

    @classmethod
    def holding(cls, checkpoint: str | os.PathLike) -> RunDir:
        """The run folder a checkpoint saved by training sits in (``<run>/checkpoints/<file>``)."""
        return cls(Path(checkpoint).absolute().parent.parent)

    @property
    def config_file(self) -> Path:  # the resolved recipe, written when the run starts
        return self.path / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_file(self) -> Path:  # one JSON object per logged step
        return self.path / "metrics.jsonl"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def hf(self) -> Path:  # the hf_export callback's Hugging Face directories
        return self.path / "hf"

    @property
    def nan_guard_file(self) -> Path:  # one line per non-finite step
        return self.path / "nan_guard.jsonl"

    @property
    def sample_ids(self) -> Path:  # debug.log_sample_ids: the pieces each step trained on
        return self.path / "sample_ids"

    def write_config(self, resolved: Mapping[str, Any]) -> None:
        """Write the resolved recipe (rank 0 only; the folder is shared by every rank)."""
        if dist.get_global_rank() == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            self.config_file.write_text(json.dumps(resolved, indent=2, default=str))

    def read_config(self) -> dict[str, Any] | None:
        return json.loads(self.config_file.read_text()) if self.config_file.is_file() else None


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URI (``s3://...``) that Composer reads or writes itself."""
    return "://" in path


# --- the checkpoint format --------------------------------------------------------------------------


def _load_file(path: str | os.PathLike) -> dict:
    """A whole-file checkpoint, memory-mapped (tensors are read only when touched), unpickling nothing
    but tensors, containers and :data:`SAFE_CHECKPOINT_GLOBALS`."""
    try:
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:  # torch's message spans a page; name what was refused
        refused = re.search(r"GLOBAL (\S+)", str(err))
        what = refused[1] if refused else "an object"
        raise pickle.UnpicklingError(
            f"it holds {what}, which reading weights never unpickles (a checkpoint runs code when fully "
            "unpickled; load only trusted files with Composer)"
        ) from None


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether ``path`` (or the folder a ``latest-rank0.pt`` link points at) holds DCP shards."""
    return (Path(path) / DCP_METADATA).is_file()


def weight_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The shape of every model weight, without reading any tensor data: a sharded checkpoint's
    metadata lists them, and a whole file is memory-mapped (its optimizer state is never read)."""
    if is_sharded(path):
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        return {
            key.removeprefix(SHARDED_MODEL_PREFIX): tuple(entry.size)
            for key, entry in metadata.items()
            if key.startswith(SHARDED_MODEL_PREFIX)
        }
    checkpoint = _load_file(path)
    return {
        name.removeprefix(COMPOSER_MODEL_PREFIX): tuple(tensor.shape)
        for name, tensor in checkpoint["state"]["model"].items()
    }


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Every model weight as a whole CPU tensor, and the file's other top-level entries (such as
    the model config :func:`flexbert.hf.import_hf` stores). The shards of a sharded checkpoint are
    put back together in this one process (no process group, no GPU); it has no other entries."""
    if not is_sharded(path):
        checkpoint = _load_file(path)
        weights = {
            name.removeprefix(COMPOSER_MODEL_PREFIX): tensor for name, tensor in checkpoint["state"]["model"].items()
        }
        return weights, {key: value for key, value in checkpoint.items() if key != "state"}
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    keys = {key for key in metadata if key.startswith(SHARDED_MODEL_PREFIX)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        loaded = _load_state_dict_from_keys(keys, checkpoint_id=str(path))
    weights = {name.removeprefix(COMPOSER_MODEL_PREFIX): tensor for name, tensor in loaded["state"]["model"].items()}
    return weights, {}


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Put a checkpoint's weights into ``model`` (unwrapped, before any DDP or FSDP), whether the
    checkpoint is one file or FSDP shards."""
    weights, _ = read_weights(path)
    model.load_state_dict(weights, strict=True)


def write_weights(path: Path, weights: Mapping[str, torch.Tensor], **extras: Any) -> None:
    """Write ``weights`` (FlexBERT names) as a whole-file checkpoint that training loads with
    ``load_path`` and ``load_weights_only``, atomically: it appears whole or not at all. ``extras`` are
    further top-level entries, such as the model config that :func:`read_weights` hands back."""
    checkpoint = {
        "state": {"model": {COMPOSER_MODEL_PREFIX + name: tensor for name, tensor in weights.items()}},
        **extras,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        torch.save(checkpoint, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def check_checkpoint_matches(path: str, model: torch.nn.Module) -> None:
    """Refuse, with the first differences named, a checkpoint saved from another architecture."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    try:
        found = weight_shapes(path)
    except Exception as err:  # a truncated file fails in many ways inside torch.load
        raise ConfigError("load_path", f"{path} is not a readable Composer checkpoint ({err})") from None
    problems = [
        f"{name}: checkpoint {found[name]} vs model {shape}"
        for name, shape in expected.items()
        if name in found and found[name] != shape
    ]
    problems += [f"{name}: missing from the checkpoint" for name in expected if name not in found]
    problems += [f"{name}: not in this model" for name in found if name not in expected]
    if problems:
        listed = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ConfigError("load_path", f"{path} was saved from a different architecture: {listed}")


# --- which model a checkpoint holds -------------------------------------------------------------


def _model_config_from_training(training_config: Mapping[str, Any]) -> tuple[FlexBertConfig, Path]:
    """The model a resolved training config builds, and its tokenizer directory.

    Only the model section and the tokenizer are read: an export often happens long after the
    training data and ``load_path`` are gone, so the rest of the recipe is not validated again.
    """
    from flexbert.data.tokenizer import load_tokenizer
    from flexbert.train.config import model_config_for  # which itself needs RunDir from here

    model, loader = training_config.get("model"), training_config.get("train_loader")
    if not isinstance(model, Mapping) or not isinstance(loader, Mapping) or "tokenizer" not in loader:
        raise CheckpointError(
            "the training config has no model: section or no train_loader.tokenizer; is it a pretraining recipe?"
        )
    tokenizer = load_tokenizer(loader["tokenizer"])
    # The kernel is a runtime choice, and the one trained with may be missing here (flash on CPU).
    return model_config_for({**model, "attn_backend": "auto"}, tokenizer), tokenizer.path


def model_from_checkpoint(
    checkpoint: str | os.PathLike, training_config: Mapping[str, Any] | None = None
) -> tuple[FlexBertForMaskedLM, Path | None]:
    """The encoder a Composer checkpoint of this project holds (a file, or a folder of FSDP shards,
    which are put back together here), and the tokenizer it was trained with when that is known.

    The model config comes from ``training_config`` when given, else from the checkpoint itself
    (written by ``flexbert import-hf`` and ``flexbert average``), else from the run folder's
    config.json (a checkpoint saved by training sits in ``<run folder>/checkpoints/``).
    """
    path = Path(checkpoint)
    if not path.exists():
        raise MissingFileError(f"checkpoint not found: {path}")
    try:
        weights, saved = read_weights(path)
    except Exception as err:  # a truncated or foreign file fails in many ways inside torch.load
        raise CheckpointError(f"{path} is not a readable Composer checkpoint ({err})") from None

    tokenizer_dir = None
    run_config_file = RunDir.holding(path).config_file
    if training_config is not None:
        config, tokenizer_dir = _model_config_from_training(training_config)
    elif MODEL_CONFIG_KEY in saved:
        config = FlexBertConfig.from_dict(saved[MODEL_CONFIG_KEY], path=MODEL_CONFIG_KEY)
    elif run_config_file.is_file():
        run_config = json.loads(run_config_file.read_text())
        if "task" in run_config:  # a fine-tune's weights: an encoder with a task head, no MLM head
            raise CheckpointError(
                f"{path} was saved by a fine-tuning run ({run_config_file} has a task: section); "
                "this needs a pretrained (masked-LM) checkpoint"
            )
        config, tokenizer_dir = _model_config_from_training(run_config)
    else:
        raise CheckpointError(
            f"cannot tell which model {path} holds: it carries no model config and there is no "
            f"run folder config.json at {run_config_file}; pass the recipe with --config"
        )

    model = FlexBertForMaskedLM(config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1:2] or [str(err)]
        raise CheckpointError(f"{path} does not hold the model its config describes: {first[0].strip()}") from None
    return model, tokenizer_dir


# --- autoresume -------------------------------------------------------------------------------------


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None if it is. ``torch.save`` writes a zip
    archive with a CRC per record: truncation loses the archive's directory, and damage anywhere
    fails a CRC (which ``torch.load`` does not check)."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
        return f"not a complete checkpoint ({err})"
    if damaged is not None:
        return f"damaged: {damaged} fails its CRC check"
    if not any(name.endswith("data.pkl") for name in names):
        return "not a torch checkpoint (no data.pkl)"
    return None


def saved_checkpoints(folder: Path) -> dict[int, Path]:
    """Every checkpoint training saved in ``folder`` (whole files and shard folders alike), by the
    batch it was saved at."""
    found = {}
    for path in folder.iterdir() if folder.is_dir() else []:
        match = SAVED_NAME.fullmatch(path.name)
        if match and not path.is_symlink() and (path.is_file() or is_sharded(path)):
            found[int(match[2])] = path
    return dict(sorted(found.items()))


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
