"""Reading the model weights out of this project's Composer checkpoints, whole or sharded.

Composer writes a checkpoint as one file (``ep0-ba6-rank0.pt``: ``torch.save`` of ``{"state":
{"model": {...}, ...}}``) or, under FSDP with ``state_dict_type: sharded``, as a folder of
torch.distributed.checkpoint (DCP) shards (``ep0-ba6/__0_0.distcp`` ..., ``.metadata``), whose
keys are the file's flattened with dots (``state.model.<name>``). Either way the model's weights
are keyed as the ComposerModel names them: ``model.<FlexBertForMaskedLM parameter>``; the functions
here hand them out under the FlexBERT model's own names.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

# The ComposerModel keeps the FlexBERT model as its attribute ``model``.
COMPOSER_MODEL_PREFIX = "model."
SHARDED_MODEL_PREFIX = "state.model." + COMPOSER_MODEL_PREFIX  # a sharded checkpoint's flattened keys
DCP_METADATA = ".metadata"


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether ``path`` (or the folder a ``latest-rank0.pt`` link points at) holds DCP shards."""
    return (Path(path) / DCP_METADATA).is_file()


def weight_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The shape of every model weight, without reading any tensor data: a sharded checkpoint's
    metadata lists them, and a whole file is memory-mapped (its optimizer state is never read)."""
    if is_sharded(path):
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        return {key.removeprefix(SHARDED_MODEL_PREFIX): tuple(entry.size) for key, entry in metadata.items()
                if key.startswith(SHARDED_MODEL_PREFIX)}
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    return {name.removeprefix(COMPOSER_MODEL_PREFIX): tuple(tensor.shape)
            for name, tensor in checkpoint["state"]["model"].items()}


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Every model weight as a whole CPU tensor, and the file's other top-level entries (such as
    the model config :func:`flexbert.hf.import_hf` stores). The shards of a sharded checkpoint are
    put back together in this one process (no process group, no GPU); it has no other entries."""
    if not is_sharded(path):
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        weights = {name.removeprefix(COMPOSER_MODEL_PREFIX): tensor for name, tensor in checkpoint["state"]["model"].items()}
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
