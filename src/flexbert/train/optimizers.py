"""Optimizers: StableAdamW (ModernBERT's), Composer's DecoupledAdamW, Muon, and which parameters decay.

Every optimizer decays weights *fully decoupled* from the learning rate: each step removes
``weight_decay · lr_t / max_lr`` of every decayed weight, where ``max_lr`` is the group's initial
(peak) lr. ``weight_decay`` is therefore an absolute per-step rate at peak lr that follows the
schedule's shape, and keeps its meaning when the peak lr changes between phases. A new optimizer is
built for each phase, so ``max_lr`` is always that phase's peak.

Muon's matrices decay by the same rule, against their own group's peak lr (``optimizer.muon.lr``).
torch's Muon and AdamW remove ``λ · lr_t`` per step instead, the same decay written per unit of lr:
their ``weight_decay=λ`` at peak lr ``η`` is ``weight_decay: λ·η`` here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from flexbert.core.model import FlexBertModel
from flexbert.registry import Registry
from flexbert.typed_config import ConfigError

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry(
    "optimizer",
    "factory(param_groups, lr, betas, eps, weight_decay) -> torch.optim.Optimizer",
    "the update rule applied to the parameters after each batch",
)


class FullyDecoupledDecay(torch.optim.Optimizer):
    """An optimizer whose groups decay by ``weight_decay · lr_t / peak lr`` (the module docstring)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # The peak lr, recorded before a scheduler rescales group["lr"] (LambdaLR does so as soon as
        # it is built); torch's schedulers only set initial_lr where it is missing, so they keep it.
        group.setdefault("initial_lr", group["lr"])
        if not group["initial_lr"] > 0:
            raise ValueError(f"decay scales with lr_t / peak lr, so the peak must be > 0, got {group['initial_lr']}")


def _decay(param: torch.Tensor, group: dict[str, Any], lr: float | torch.Tensor) -> None:
    if group["weight_decay"]:
        param.mul_(1 - group["weight_decay"] * lr / group["initial_lr"])


def _advance_adam_moments(state: dict[str, Any], param: torch.Tensor, betas: tuple[float, float]) -> None:
    """Adam's step count and first and second moments of ``param``'s gradient, one step on."""
    if not state:
        # A step count on the device keeps the bias correction free of host syncs.
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    beta1, beta2 = betas
    grad = param.grad
    state["step"].add_(1)
    state["exp_avg"].lerp_(grad, 1 - beta1)
    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def _bias_corrected(state: dict[str, Any], betas: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's m̂ and v̂."""
    beta1, beta2 = betas
    return state["exp_avg"] / (1 - beta1 ** state["step"]), state["exp_avg_sq"] / (1 - beta2 ** state["step"])


@OPTIMIZERS.register("stable_adamw")
class StableAdamW(FullyDecoupledDecay):
    """AdamW whose per-tensor lr is divided by the RMS of g²/v̂ when it exceeds 1 (Wortsman et al., 2023).

    When a gradient is far larger than its second-moment estimate v̂ remembers, as after a quiet
    stretch, Adam's step m̂/√v̂ is far larger than intended and can destabilise training. StableAdamW
    detects this per tensor with ``RMS_t = sqrt(mean(g_t² / max(v̂_t, eps²)))`` and takes the step,
    weight decay included, with ``η_t = lr_t / max(1, RMS_t)``. This replaces gradient clipping.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 8e-4,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 1e-5,
    ):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = [(param, group) for group in self.param_groups for param in group["params"] if param.grad is not None]
        # Two passes, so that a sharded model's clipping statistics cross the processes together:
        # first the moments and each parameter's sum of g²/v̂ over this rank's shard, then, once
        # every sum is complete, the updates.
        ratio_sums = [self._update_moments(param, group) for param, group in stepped]
        for (param, group), ratio_sum in zip(stepped, _summed_over_shards(ratio_sums, [p for p, _ in stepped])):
            self._apply_update(param, group, ratio_sum)
        return loss

    def _update_moments(self, param: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Advance ``param``'s step count and moments; return this rank's part of ``sum(g²/v̂)``:
        the whole sum for a plain tensor, the sum over the local shard for a DTensor."""
        state = self.state[param]
        _advance_adam_moments(state, param, group["betas"])
        v_hat = _local(state["exp_avg_sq"]) / (1 - group["betas"][1] ** state["step"])
        return (_local(param.grad).square() / v_hat.clamp(min=group["eps"] ** 2)).sum()

    def _apply_update(self, param: torch.Tensor, group: dict[str, Any], ratio_sum: torch.Tensor) -> None:
        """The clipped step, weight decay included, from the complete ``sum(g²/v̂)`` of ``param``."""
        m_hat, v_hat = _bias_corrected(self.state[param], group["betas"])
        rms = (ratio_sum / param.numel()).sqrt()
        lr = group["lr"] / rms.clamp(min=1.0)  # a 0-d tensor: the clip is applied without reading rms
        _decay(param, group, lr)
        param.sub_(lr * m_hat / (v_hat.sqrt() + group["eps"]))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _summed_over_shards(local_sums: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each parameter's complete sum from each rank's ``local_sums`` (0-d tensors), with one
    all-reduce per sharded mesh dimension for all parameters together, where a DTensor's sum
    over each parameter would have been one collective per parameter.

    A plain tensor's sum is already complete; a DTensor's is partial over every mesh dimension
    it is sharded along (FSDP2's ``Shard(0)``; HSDP also replicates along another, which holds
    the same sums). Adding each 0-d sum over the same group in one vector instead of one by
    one gives the same values: every element is still the sum of the same terms.
    """
    complete = list(local_sums)
    partial: dict[tuple[Any, int], list[int]] = {}  # (mesh, sharded dim) -> which sums
    for index, param in enumerate(params):
        if isinstance(param, DTensor):
            for dim, placement in enumerate(param.placements):
                if placement.is_shard():
                    partial.setdefault((param.device_mesh, dim), []).append(index)
    for (mesh, dim), indices in partial.items():
        sums = torch.stack([complete[index] for index in indices])
        torch.distributed.all_reduce(sums, group=mesh.get_group(dim))
        for index, total in zip(indices, sums.unbind()):
            complete[index] = total
    return complete


@OPTIMIZERS.register("decoupled_adamw")
def decoupled_adamw(params, **settings) -> torch.optim.Optimizer:
    """Composer's AdamW with weight decay scaled by lr_t/initial_lr, no update clipping."""
    # Imported here, so that this module (and StableAdamW) also serves a GPU node without Composer.
    from composer.optim import DecoupledAdamW

    return DecoupledAdamW(params, **settings)


# Jordan (2024)'s quintic Newton–Schulz coefficients (torch.optim.Muon's too): the steepest slope at
# zero for which five steps still bring every singular value of a normalised matrix into about [0.7, 1.2].
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# The floor of the Frobenius norm a matrix is divided by: only a matrix of zeros reaches it.
NORM_FLOOR = 1e-7
NEWTON_SCHULZ_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

# How Muon scales the step of a (rows × cols) matrix, by the names torch.optim.Muon's adjust_lr_fn gives them.
LR_ADJUSTMENTS: dict[str, Callable[[int, int], float]] = {
    # Jordan (2024): an orthogonal step's RMS per element is 1/sqrt(max(rows, cols)); this makes it 1/sqrt(cols).
    "original": lambda rows, cols: math.sqrt(max(1, rows / cols)),
    # Liu et al. (2025), Moonlight: an update RMS of 0.2, AdamW's typical one, so AdamW's lr and decay carry over.
    "match_rms_adamw": lambda rows, cols: 0.2 * math.sqrt(max(rows, cols)),
    # Bernstein (2025), "Deriving Muon": the spectral-norm condition sqrt(fan_out / fan_in), unclamped.
    "spectral_unclamped": lambda rows, cols: math.sqrt(rows / cols),
}


def newton_schulz(matrix: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """``U·S'·Vᵀ`` for ``matrix = U·S·Vᵀ``, with every singular value of ``S'`` near 1 (in about
    [0.7, 1.2] after five steps), computed in ``dtype``.

    The matrix is divided by its Frobenius norm, which bounds its spectral norm by 1; each step then
    maps X to ``a·X + (b·A + c·A²)·X`` with ``A = X·Xᵀ``, an odd polynomial of X that moves every
    singular value towards 1 and leaves U and V as they are (Jordan, 2024). A tall matrix is
    transposed first, so that A is the smaller of its two Gram matrices.
    """
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    tall = matrix.size(0) > matrix.size(1)
    x = (matrix.mT if tall else matrix).to(dtype)
    x = x / x.norm().clamp(min=NORM_FLOOR)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


@dataclass
class MuonConfig:
    """``optimizer.muon``: how Muon steps the encoder layers' matrices. Defaults are Jordan (2024)'s,
    and torch.optim.Muon's but for lr and weight_decay (docs/recipes-since-modernbert.md)."""

    lr: float = 0.02  # peak lr of the matrices, before the adjust_lr scaling; the scheduler scales it
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5  # Newton–Schulz iterations
    weight_decay: float = 1e-5  # fully decoupled, as optimizer.weight_decay: torch's λ at peak lr η is λ·η
    adjust_lr: str = "original"  # a key of LR_ADJUSTMENTS
    ns_dtype: str = "bfloat16"  # the precision of the Newton–Schulz iteration, as torch's and Jordan's

    def validate(self, path: str = "optimizer.muon") -> None:
        if not self.lr > 0:
            raise ConfigError(f"{path}.lr", f"must be > 0, got {self.lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"{path}.momentum", f"must be in [0, 1), got {self.momentum}")
        if self.ns_steps < 1:
            raise ConfigError(f"{path}.ns_steps", f"must be at least 1, got {self.ns_steps}")
        if self.weight_decay < 0:
            raise ConfigError(f"{path}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        for key, allowed in (("adjust_lr", LR_ADJUSTMENTS), ("ns_dtype", NEWTON_SCHULZ_DTYPES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{path}.{key}", f"must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")


@OPTIMIZERS.register("muon", options=MuonConfig)
class Muon(FullyDecoupledDecay):
    """Muon (Jordan, 2024) for the encoder layers' matrices, AdamW for every other parameter.

    A hidden layer's matrix maps features to features. Muon steps it along its orthogonalised
    momentum, the ``U·Vᵀ`` of its SVD as Newton–Schulz approximates it (:func:`newton_schulz`), so
    that the step moves every direction of the map alike, where a gradient's step is dominated by a
    few. Embeddings, norms, biases and the MLM head are no such maps, and AdamW steps them, as in
    Jordan's and in Liu et al. (2025)'s Moonlight.

    Groups flagged ``muon: True`` (:func:`parameter_groups`) hold matrices only, and take lr,
    weight_decay and the other Muon settings from ``options`` where the group does not set them; the
    other groups are AdamW's (``lr``, ``betas``, ``eps``, ``weight_decay``, bias-corrected moments).
    For a matrix W of shape (rows, cols) with gradient G, each step is::

        B ← μ·B + (1 − μ)·G                           momentum, B starting at zero
        D ← (1 − μ)·G + μ·B if nesterov, else B
        W ← W·(1 − weight_decay·lr_t / peak lr) − lr_t·s(rows, cols)·NewtonSchulz(D)

    with ``s`` the ``adjust_lr`` rule (:data:`LR_ADJUSTMENTS`): torch.optim.Muon's update, its decay
    written fully decoupled (see the module docstring).

    Under FSDP2 a matrix is a DTensor of which each process holds a block of rows, and Newton–Schulz
    needs the whole matrix. Each process gathers D (``full_tensor``), orthogonalises it and keeps its
    own rows, as Liu et al.'s Distributed Muon does, rather than one process orthogonalising each
    matrix and scattering its rows back: that would save computation that is small here (ns_steps ×
    3 products of at most rows·cols·min(rows, cols) each; for ModernBERT-base about 2 TFLOP per step
    and process, under 1% of a step's forward and backward at its 4608-row batches on 8 GPUs), while
    every process computing the same product from the same matrix keeps the sharded weights bitwise
    those an unsharded optimizer computes from the same gradients. The gather moves what one
    all-gather of the weights moves, one matrix at a time, so no more than one whole matrix is held
    beside the shards.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 8e-4,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 1e-5,
        options: MuonConfig | None = None,
    ):
        self.options = options or MuonConfig()
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, muon=False))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if param_group.get("muon"):
            for key, value in vars(self.options).items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        not_matrices = [tuple(param.shape) for param in group["params"] if param.ndim != 2]
        if group["muon"] and not_matrices:
            self.param_groups.pop()
            raise ValueError(f"Muon orthogonalises matrices only; its group holds a tensor of shape {not_matrices[0]}")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            advance = self._orthogonalised_step if group["muon"] else self._adamw_step
            for param in group["params"]:
                if param.grad is not None:
                    advance(param, group)
        return loss

    def _orthogonalised_step(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        momentum, buffer = group["momentum"], state["momentum_buffer"]
        buffer.lerp_(param.grad, 1 - momentum)
        direction = param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
        orthogonal = newton_schulz(_whole(direction), group["ns_steps"], NEWTON_SCHULZ_DTYPES[group["ns_dtype"]])
        rows, cols = param.shape
        _decay(param, group, group["lr"])
        param.add_(_shaped_like(orthogonal, param), alpha=-group["lr"] * LR_ADJUSTMENTS[group["adjust_lr"]](rows, cols))

    def _adamw_step(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        _advance_adam_moments(state, param, group["betas"])
        m_hat, v_hat = _bias_corrected(state, group["betas"])
        _decay(param, group, group["lr"])
        param.sub_(group["lr"] * m_hat / (v_hat.sqrt() + group["eps"]))


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole on every rank; a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _shaped_like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``whole``, sharded as ``param`` is where it is a DTensor: each rank cuts its own part, without
    communicating, since every rank holds the same ``whole``."""
    if isinstance(param, DTensor):
        return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
    return whole


def encoder_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights of the encoder's layers (attention's Wqkv and Wo, the MLP's Wi and Wo): the
    maps from hidden features to hidden features, which Muon steps."""
    return [
        param
        for encoder in model.modules()
        if isinstance(encoder, FlexBertModel)
        for name, param in encoder.layers.named_parameters()
        if param.ndim == 2 and not name.endswith("bias")
    ]


def parameter_groups(
    model: nn.Module, weight_decay: float, decay_embeddings: bool = True, muon: bool = False
) -> list[dict[str, Any]]:
    """Trainable parameters split into a decayed group and an undecayed one; with ``muon``, the
    encoder layers' matrices (:func:`encoder_matrices`) first, in a group of their own flagged for
    :class:`Muon`, which sets its lr and decay.

    Norm gains and biases (``ndim <= 1``, or named ``*bias``) set scales and offsets rather than
    features; pulling them towards zero would only bias the model. Embedding tables are matrices and
    decay like them, unless ``decay_embeddings`` is False.
    """
    matrices = {id(param) for param in encoder_matrices(model)} if muon else set()
    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    orthogonalised, decayed, undecayed = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim <= 1 or name.endswith("bias") or (not decay_embeddings and id(param) in embeddings)
        (orthogonalised if id(param) in matrices else undecayed if exempt else decayed).append(param)
    if muon and not orthogonalised:
        raise ConfigError(
            "optimizer.name",
            "muon steps the 2-D weights of the encoder's layers, and this model has no trainable one; "
            "choose stable_adamw or decoupled_adamw",
        )
    groups = [
        {"params": orthogonalised, "muon": True},
        {"params": decayed, "weight_decay": weight_decay},
        {"params": undecayed, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


@dataclass
class OptimizerConfig:
    """The ``optimizer:`` section of a recipe. Defaults are ModernBERT-base's pretraining."""

    name: str = "stable_adamw"
    lr: float = 8e-4  # peak lr; the scheduler's multiplier scales it
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 1e-5  # fraction of each decayed weight removed per step at peak lr
    decay_embeddings: bool = True
    # name: muon only, its settings for the encoder layers' matrices; the keys above then set the
    # AdamW that steps every other parameter (embeddings, norms, biases, the head).
    muon: MuonConfig | None = None

    def validate(self, path: str = "optimizer") -> None:
        """Raise :class:`ConfigError` naming the first field whose value cannot work."""
        if self.name not in OPTIMIZERS:
            raise ConfigError(
                f"{path}.name", f"unknown optimizer {self.name!r}; registered: {', '.join(OPTIMIZERS.names())}"
            )
        if not self.lr > 0:
            raise ConfigError(f"{path}.lr", f"must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ConfigError(f"{path}.betas", f"must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ConfigError(f"{path}.eps", f"must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ConfigError(f"{path}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.muon is not None and self.name != "muon":
            raise ConfigError(
                f"{path}.muon", f"only the muon optimizer reads this section; {path}.name is {self.name!r}"
            )


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """A fresh optimizer over ``model``'s trainable parameters, from a validated config."""
    groups = parameter_groups(model, config.weight_decay, config.decay_embeddings, muon=config.name == "muon")
    choice = config.name if config.muon is None else {"name": config.name, **vars(config.muon)}
    return OPTIMIZERS.get(choice, "optimizer.muon")(
        groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay
    )
