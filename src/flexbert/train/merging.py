"""Model merging relative to a base: ``linear`` (task arithmetic) and ``ties`` (Yadav et al., 2023,
"TIES-Merging: Resolving Interference When Merging Models"). mmBERT merged its decay-phase variants
with TIES.

Each checkpoint i gives a task vector, tau_i = theta_i - theta_base, and the methods combine them into
one, tau, so that the merged model is theta_base + scale * tau:

* ``linear``: tau = sum_i w_i tau_i, so that the merged model is (1 - sum_i w_i) theta_base +
  sum_i w_i theta_i (at scale 1). The default weights, 1/N each, give the plain mean of the checkpoints
  (what ``flexbert average`` writes: the base cancels out); weights summing to 1 give a weighted mean;
  any other sum keeps 1 - sum_i w_i of the base (task arithmetic).
* ``ties``: trim each task vector to its largest-magnitude entries (the rest become 0), elect each
  entry's sign as the sign of the sum of the trimmed values, and take the mean of the trimmed values
  that carry the elected sign (the disjoint mean; an entry whose trimmed values sum to 0 stays 0).

TIES trims each tensor of a task vector on its own, keeping round(density * numel) entries (at least
one) and any tied in magnitude with the smallest of them, so the result does not depend on the order of
the entries. The paper ranks a whole task vector at once; per tensor, magnitudes are compared only
within a tensor, whose entries share one scale (norm gains, embedding rows and projections change on
different scales, and one global threshold can keep a tensor whole or reset it to the base for what
happens elsewhere), and the decoder, stored a second time under its own name as the tied token
embeddings, is trimmed alike under both names rather than counted twice. mergekit trims per tensor
too, so its densities carry over.

Every tensor is computed in float64 and returned in the base's dtype. Tensors that are not floating
point (integer buffers) are not interpolated: they must be equal in every checkpoint and the base.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence

import torch

from flexbert.core.checkpoint import read_checkpoint
from flexbert.errors import CheckpointError, FlexBertError
from flexbert.train.averaging import check_same_architecture

METHODS = ("linear", "ties")
DEFAULT_DENSITY = 0.2  # the paper's k = 20%
# A tensor's task vectors, stacked along a first dimension of one row per checkpoint, to the change
# the merge makes to the base's tensor: scale * tau.
Combine = Callable[[torch.Tensor], torch.Tensor]


class MergeError(FlexBertError, ValueError):
    """Merge options that do not fit: the method, its density or weights, the scale."""


def trim(task_vectors: torch.Tensor, density: float) -> torch.Tensor:
    """Each row of ``task_vectors`` (one checkpoint's, flattened) with every entry set to 0 but its
    round(density * numel) largest in magnitude (at least one) and any tied with the smallest of those."""
    magnitudes = task_vectors.abs()
    numel = magnitudes.shape[1]
    keep = max(1, round(density * numel))
    threshold = magnitudes.kthvalue(numel - keep + 1, dim=1, keepdim=True).values  # the keep-th largest
    return torch.where(magnitudes >= threshold, task_vectors, 0.0)


def ties(task_vectors: torch.Tensor, density: float) -> torch.Tensor:
    """TIES-Merging's task vector: trim, elect each entry's sign by the sum of the trimmed values,
    and average the trimmed values of the elected sign."""
    trimmed = trim(task_vectors.reshape(len(task_vectors), -1), density)
    elected = torch.sign(trimmed.sum(dim=0))
    # Where the sum is 0 the elected sign is 0, and only zeros carry it: the entry stays 0.
    agrees = torch.sign(trimmed) == elected
    total = torch.where(agrees, trimmed, 0.0).sum(dim=0)
    merged = total / agrees.sum(dim=0).clamp(min=1)
    return merged.reshape(task_vectors.shape[1:])


def task_vector_merger(
    method: str, count: int, weights: Sequence[float] | None = None, density: float | None = None, scale: float = 1.0
) -> Combine:
    """How ``method`` combines the task vectors of ``count`` checkpoints, scaled by ``scale``, with its
    options checked before any checkpoint is read: one line for an unknown method, a density outside
    (0, 1], weights that are not one finite number per checkpoint, an option the method does not take,
    or a scale that is not a finite number."""
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}: choose {' or '.join(METHODS)}")
    if count < 1:
        raise MergeError("nothing to merge: name at least one checkpoint besides the base")
    if not math.isfinite(scale):
        raise MergeError(f"--scale {scale}: the scale of the merged task vector must be a finite number")
    if method == "ties":
        if weights is not None:
            raise MergeError("--weights is for --method linear; TIES averages the values of the elected sign")
        density = DEFAULT_DENSITY if density is None else density
        if not 0 < density <= 1:
            raise MergeError(f"--density {density}: the fraction of each task vector kept must lie in (0, 1]")
        return lambda task_vectors: scale * ties(task_vectors, density)
    if density is not None:
        raise MergeError("--density is for --method ties; a linear merge keeps every entry")
    weights = [1 / count] * count if weights is None else list(weights)
    if len(weights) != count:
        raise MergeError(f"--weights gives {len(weights)} weights for {count} checkpoints; give one per checkpoint")
    if not all(math.isfinite(weight) for weight in weights):
        raise MergeError(f"--weights {','.join(map(str, weights))}: every weight must be a finite number")
    factors = torch.tensor(weights, dtype=torch.float64)
    return lambda task_vectors: scale * torch.tensordot(factors, task_vectors, dims=1)


def merge_weights(
    base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]], combine: Combine
) -> dict[str, torch.Tensor]:
    """theta_base + combine(tau_1 ... tau_N), tensor by tensor, in float64, returned in the base's
    dtypes. The models hold the base's tensors (:func:`merge_checkpoints` checks it); a tensor that is
    not floating point is the base's."""
    merged = {}
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            merged[name] = tensor
            continue
        origin = tensor.to(torch.float64)
        task_vectors = torch.stack([model[name].to(torch.float64) - origin for model in models])
        merged[name] = (origin + combine(task_vectors)).to(tensor.dtype)
    return merged


def merge_checkpoints(
    base: str | os.PathLike, paths: Sequence[str | os.PathLike], combine: Combine
) -> dict[str, torch.Tensor]:
    """:func:`merge_weights` of checkpoints (whole files or FSDP shard folders) onto ``base``. One line
    for a checkpoint that is missing or unreadable, one whose tensors differ from the base's in name or
    shape (naming the first), or one whose tensor that is not floating point differs from the base's.
    Every checkpoint is held at once: whole files memory-mapped, shard folders in memory."""
    reference, _ = read_checkpoint(base)
    models = []
    for path in paths:
        weights, _ = read_checkpoint(path)
        check_same_architecture(base, reference, path, weights)
        for name, tensor in reference.items():
            if not tensor.is_floating_point() and not torch.equal(tensor, weights[name]):
                raise CheckpointError(
                    f"{path} and {base} differ in {name}, a {tensor.dtype} tensor, which is not merged: "
                    "it must be equal in every checkpoint"
                )
        models.append(weights)
    return merge_weights(reference, models, combine)
