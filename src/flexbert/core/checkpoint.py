"""Everything about this project's checkpoints and run folders, in one place.

* **The run folder** (:class:`RunDir`): ``<run_root>/<run_name>/`` holds ``config.json`` (the resolved
  recipe), ``checkpoints/``, ``metrics.jsonl``, ``plots/``, ``hf/``, ``data_order/`` and ``nan_guard.jsonl``.
* **The Composer checkpoint format.** Composer writes a checkpoint as one file (``ep0-ba6-rank0.pt``:
  ``torch.save`` of ``{"state": {"model": {...}, ...}}``) or, under FSDP with ``state_dict_type:
  sharded``, as a folder of torch.distributed.checkpoint (DCP) shards (``ep0-ba6/__0_0.distcp`` ...,
  ``.metadata``), whose keys are the file's flattened with dots (``state.model.<name>``). Either way
  the model's weights are keyed as the ComposerModel names them, ``model.<FlexBERT parameter>``; the
  functions here read and write them under the FlexBERT model's own names.
* **Which model a checkpoint holds** (:func:`model_from_checkpoint`): from the checkpoint itself, the
  run folder's resolved recipe, or a recipe given.

This module needs torch alone (and ``torch.distributed.checkpoint`` for shards): it is how the export,
encode and evaluation commands read checkpoints without Composer. Training builds on it
(``flexbert.train.resume``: autoresume and the callbacks that survive interruption).

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
import uuid
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

from flexbert.core.model import FlexBertConfig, FlexBertForMaskedLM
from flexbert.core.object_storage import DCP_METADATA, is_remote, local_checkpoint
from flexbert.core.tokenizer import MLMTokenizer, load_tokenizer
from flexbert.errors import CheckpointError, MissingFileError
from flexbert.typed_config import ConfigError

# The ComposerModel keeps the FlexBERT model as its attribute ``model``.
COMPOSER_MODEL_PREFIX = "model."
SHARDED_MODEL_PREFIX = "state.model." + COMPOSER_MODEL_PREFIX  # a sharded checkpoint's flattened keys
LATEST_LINK = "latest-rank0.pt"
# Where a checkpoint that import-hf or averaging wrote keeps its model config. Composer reads only the
# "state" (and "rng") entries of a checkpoint file, so this one travels along unread by training.
MODEL_CONFIG_KEY = "flexbert_model_config"
# ``flexbert import-hf``: the directory a checkpoint was imported from, when it holds a tokenizer,
# so that a run starting from the checkpoint finds the tokenizer that goes with it.
TOKENIZER_DIR_KEY = "flexbert_tokenizer_dir"
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
    def data_order(self) -> Path:  # the pieces each step trained on, per rank (train/data_order.py)
        return self.path / "data_order"

    def write_config(self, resolved: Mapping[str, Any]) -> None:
        """Write the resolved recipe (by one process: the folder is shared by every rank)."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(json.dumps(resolved, indent=2, default=str))

    def read_config(self) -> dict[str, Any] | None:
        return json.loads(self.config_file.read_text()) if self.config_file.is_file() else None


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
    the model config :func:`flexbert.core.hf.import_hf` stores). The shards of a sharded checkpoint are
    put back together in this one process (no process group, no GPU); it has no other entries."""
    if not is_sharded(path):
        checkpoint = _load_file(path)
        weights = {
            name.removeprefix(COMPOSER_MODEL_PREFIX): tensor for name, tensor in checkpoint["state"]["model"].items()
        }
        return weights, {key: value for key, value in checkpoint.items() if key != "state"}
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


def with_tokenizer_ids(model: dict[str, Any], tokenizer: MLMTokenizer) -> dict[str, Any]:
    """A recipe's model section with its special-token ids taken from the tokenizer unless given;
    given ids must agree with it (a silently wrong pad id is a classic pretraining bug)."""
    tokenizer_ids = {
        "pad_token_id": tokenizer.pad_id,
        "cls_token_id": tokenizer.cls_id,
        "sep_token_id": tokenizer.sep_id,
    }
    for key, token_id in tokenizer_ids.items():
        if key in model and model[key] != token_id:
            raise ConfigError(
                f"model.{key}", f"{model[key]} disagrees with the tokenizer {tokenizer.path}, whose id is {token_id}"
            )
    return {**model, **tokenizer_ids}


def model_config_for(model: dict[str, Any], tokenizer: MLMTokenizer) -> FlexBertConfig:
    """A recipe's model section, checked against the tokenizer that feeds it: the vocabulary holds
    every token it can produce, and the special-token ids are its own."""
    vocab_size = model.get("vocab_size", FlexBertConfig.__dataclass_fields__["vocab_size"].default)
    if isinstance(vocab_size, int) and tokenizer.vocab_size > vocab_size:
        raise ConfigError(
            "model.vocab_size", f"{vocab_size} is smaller than the {tokenizer.vocab_size} tokens of {tokenizer.path}"
        )
    return FlexBertConfig.from_dict(with_tokenizer_ids(model, tokenizer), path="model")


def saved_model_config(model: Mapping[str, Any], tokenizer: MLMTokenizer) -> FlexBertConfig:
    """The model a finished run's recipe built. The kernel is a runtime choice, and the one trained
    with may be missing here (flash on a CPU), so it is chosen anew."""
    return model_config_for({**model, "attn_backend": "auto"}, tokenizer)


def _model_config_from_training(training_config: Mapping[str, Any]) -> tuple[FlexBertConfig, Path]:
    """The model a resolved training config builds, and its tokenizer directory.

    Only the model section and the tokenizer are read: an export often happens long after the
    training data and ``load_path`` are gone, so the rest of the recipe is not validated again.
    """
    model, loader = training_config.get("model"), training_config.get("train_loader")
    if not isinstance(model, Mapping) or not isinstance(loader, Mapping) or "tokenizer" not in loader:
        raise CheckpointError(
            "the training config has no model: section or no train_loader.tokenizer; is it a pretraining recipe?"
        )
    tokenizer = load_tokenizer(loader["tokenizer"])
    return saved_model_config(model, tokenizer), tokenizer.path


def checkpoint_model_config(
    path: Path, saved: Mapping[str, Any], training_config: Mapping[str, Any] | None = None
) -> tuple[FlexBertConfig, Path | None]:
    """The model config of checkpoint ``path`` (``saved``: the file's entries besides its state), and
    the tokenizer it was trained with when that is known.

    The config comes from ``training_config`` when given, else from the checkpoint itself (written by
    ``flexbert import-hf`` and ``flexbert average``), else from the run folder's config.json (a
    checkpoint saved by training sits in ``<run folder>/checkpoints/``).
    """
    run_config_file = RunDir.holding(path).config_file
    if training_config is not None:
        return _model_config_from_training(training_config)
    if MODEL_CONFIG_KEY in saved:
        config = FlexBertConfig.from_dict(saved[MODEL_CONFIG_KEY], path=MODEL_CONFIG_KEY)
        tokenizer_dir = saved.get(TOKENIZER_DIR_KEY)
        if tokenizer_dir is not None and not (Path(tokenizer_dir) / "tokenizer.json").is_file():
            tokenizer_dir = None  # the directory it was imported from is gone
        return config, None if tokenizer_dir is None else Path(tokenizer_dir)
    if run_config_file.is_file():
        run_config = json.loads(run_config_file.read_text())
        if "task" in run_config:  # a fine-tune's weights: an encoder with a task head, no MLM head
            raise CheckpointError(
                f"{path} was saved by a fine-tuning run ({run_config_file} has a task: section); "
                "this needs a pretrained (masked-LM) checkpoint"
            )
        return _model_config_from_training(run_config)
    raise CheckpointError(
        f"cannot tell which model {path} holds: it carries no model config and there is no "
        f"run folder config.json at {run_config_file}; pass the recipe with --config"
    )


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """:func:`read_weights`, with one line for a path that is missing or not a checkpoint."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"checkpoint not found: {path}")
    try:
        return read_weights(path)
    except Exception as err:  # a truncated or foreign file fails in many ways inside torch.load
        raise CheckpointError(f"{path} is not a readable Composer checkpoint ({err})") from None


def model_from_checkpoint(
    checkpoint: str | os.PathLike, training_config: Mapping[str, Any] | None = None
) -> tuple[FlexBertForMaskedLM, Path | None]:
    """The encoder a Composer checkpoint of this project holds (a file, or a folder of FSDP shards,
    which are put back together here), and the tokenizer it was trained with when that is known
    (the config's sources: :func:`checkpoint_model_config`). ``checkpoint`` may be an ``s3://`` URI
    (:mod:`flexbert.core.object_storage`): it is read from a temporary copy."""
    if is_remote(checkpoint):
        with local_checkpoint(checkpoint) as local:
            try:
                return model_from_checkpoint(local, training_config)
            except CheckpointError as err:  # name the URI, not the temporary copy
                run = RunDir.holding(local)
                remote_folder = str(checkpoint).rstrip("/").rpartition("/")[0]
                message = str(err).replace(str(run.config_file), f"{remote_folder}/config.json")
                raise CheckpointError(message.replace(str(local), str(checkpoint))) from None
    path = Path(checkpoint)
    weights, saved = read_checkpoint(path)
    config, tokenizer_dir = checkpoint_model_config(path, saved, training_config)
    model = FlexBertForMaskedLM(config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1:2] or [str(err)]
        raise CheckpointError(f"{path} does not hold the model its config describes: {first[0].strip()}") from None
    return model, tokenizer_dir


# --- integrity -------------------------------------------------------------------------------------


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
