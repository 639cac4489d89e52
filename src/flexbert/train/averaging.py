"""Checkpoint averaging: the released ModernBERT-base is the mean of its three best decay checkpoints
and the last one (paper, appendix A.4).

``flexbert average`` takes the checkpoints by name, or picks them from a run folder by the eval loss
logged at the step each was saved. Whole files and FSDP shard folders are read alike; the result is
one whole-file checkpoint carrying its model config, which training loads (``load_path`` with
``load_weights_only``) and ``flexbert export-hf`` exports.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from flexbert.core.checkpoint import SAVED_NAME, RunDir, read_checkpoint, saved_checkpoints
from flexbert.core.object_storage import is_remote, saved_remote_checkpoints
from flexbert.errors import CheckpointError
from flexbert.train.loggers import read_metrics

EVAL_LOSS = "metrics/eval/LanguageCrossEntropy"


def average_weights(paths: Sequence[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the checkpoints' model weights, summed in float64 and returned in each
    tensor's own dtype. Checkpoints of different architectures are refused, naming the first
    tensor that differs."""
    if not paths:
        raise CheckpointError("nothing to average: name at least one checkpoint")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in paths:
        weights, _ = read_checkpoint(path)
        if not total:
            dtypes = {name: tensor.dtype for name, tensor in weights.items()}
            total = {name: tensor.to(torch.float64) for name, tensor in weights.items()}
            continue
        check_same_architecture(paths[0], total, path, weights)
        for name, tensor in weights.items():
            total[name] += tensor.to(torch.float64)
    return {name: (tensor / len(paths)).to(dtypes[name]) for name, tensor in total.items()}


def check_same_architecture(
    reference_path: str | os.PathLike,
    reference: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    weights: Mapping[str, torch.Tensor],
) -> None:
    """Refuse, naming the first tensor that differs, a checkpoint whose tensors are not the
    reference's (by name and shape): averaging checks every checkpoint against its first, merging
    (:mod:`flexbert.train.merging`) against the base."""
    problem = _first_difference(reference, weights)
    if problem is not None:
        raise CheckpointError(f"{path} and {reference_path} hold different architectures: {problem}")


def _first_difference(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> str | None:
    for name in sorted(reference.keys() ^ other.keys()):
        return f"{name} is in only one of them"
    for name, tensor in reference.items():
        if tensor.shape != other[name].shape:
            return f"{name} is {tuple(other[name].shape)} in one and {tuple(tensor.shape)} in the other"
    return None


def pick_checkpoints(run_dir: RunDir, best: int, last: bool) -> tuple[list[Path | str], list[Path | str]]:
    """(picked, unscored): the ``best`` checkpoints of a run by the eval loss logged at the step each
    was saved, then (if ``last``) its last checkpoint, once; and the checkpoints ``best`` passed over
    because no eval loss was logged at their step (a save on SIGTERM, or one between evaluations).
    A run whose ``save_folder`` is in object storage has them there: they are URIs."""
    save_folder = (run_dir.read_config() or {}).get("save_folder")
    if isinstance(save_folder, str) and is_remote(save_folder):
        saved, where = saved_remote_checkpoints(save_folder, SAVED_NAME), save_folder
    else:
        saved, where = saved_checkpoints(run_dir.checkpoints), run_dir.checkpoints
    if not saved:
        raise CheckpointError(f"{where} holds no checkpoints")
    picked, unscored = [], []
    if best > 0:
        losses = {row["step"]: row[EVAL_LOSS] for row in read_metrics(run_dir.path) if EVAL_LOSS in row}
        unscored = [path for step, path in saved.items() if step not in losses]
        scored = [step for step in saved if step in losses]
        if not scored:
            raise CheckpointError(
                f"no eval loss was logged at the step of any checkpoint in {where} "
                f"({run_dir.metrics_file}); --best needs an evaluation at every save: an eval_loader, and "
                "eval_interval equal to save_interval"
            )
        picked = [saved[step] for step in sorted(scored, key=lambda step: losses[step])[:best]]
    if last and saved[max(saved)] not in picked:
        picked.append(saved[max(saved)])
    return picked, unscored
