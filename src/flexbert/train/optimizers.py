"""Optimizers: StableAdamW (ModernBERT's), Composer's DecoupledAdamW, and which parameters decay.

Both optimizers decay weights *fully decoupled* from the learning rate: each step removes
``weight_decay · lr_t / max_lr`` of every decayed weight, where ``max_lr`` is the group's initial
(peak) lr. ``weight_decay`` is therefore an absolute per-step rate at peak lr that follows the
schedule's shape, and keeps its meaning when the peak lr changes between phases. A new optimizer is
built for each phase, so ``max_lr`` is always that phase's peak.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from flexbert.registry import Registry
from flexbert.typed_config import ConfigError

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry(
    "optimizer",
    "factory(param_groups, lr, betas, eps, weight_decay) -> torch.optim.Optimizer",
    "the update rule applied to the parameters after each batch",
)


@OPTIMIZERS.register("stable_adamw")
class StableAdamW(torch.optim.Optimizer):
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

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        # The peak lr, recorded before a scheduler rescales group["lr"] (LambdaLR does so as soon as
        # it is built); torch's schedulers only set initial_lr where it is missing, so they keep it.
        group.setdefault("initial_lr", group["lr"])
        if not group["initial_lr"] > 0:
            raise ValueError(f"decay scales with lr_t / peak lr, so the peak must be > 0, got {group['initial_lr']}")

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
        if not state:
            # A step count on the device keeps the bias correction free of host syncs.
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        grad = param.grad
        state["step"].add_(1)
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        v_hat = _local(state["exp_avg_sq"]) / (1 - beta2 ** state["step"])
        return (_local(grad).square() / v_hat.clamp(min=group["eps"] ** 2)).sum()

    def _apply_update(self, param: torch.Tensor, group: dict[str, Any], ratio_sum: torch.Tensor) -> None:
        """The clipped step, weight decay included, from the complete ``sum(g²/v̂)`` of ``param``."""
        beta1, beta2 = group["betas"]
        state = self.state[param]
        m_hat = state["exp_avg"] / (1 - beta1 ** state["step"])
        v_hat = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
        rms = (ratio_sum / param.numel()).sqrt()
        lr = group["lr"] / rms.clamp(min=1.0)  # a 0-d tensor: the clip is applied without reading rms
        if group["weight_decay"]:
            param.mul_(1 - group["weight_decay"] * lr / group["initial_lr"])
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


def parameter_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = True) -> list[dict[str, Any]]:
    """Trainable parameters split into a decayed group and an undecayed one.

    Norm gains and biases (``ndim <= 1``, or named ``*bias``) set scales and offsets rather than
    features; pulling them towards zero would only bias the model. Embedding tables are matrices and
    decay like them, unless ``decay_embeddings`` is False.
    """
    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    decayed, undecayed = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim <= 1 or name.endswith("bias") or (not decay_embeddings and id(param) in embeddings)
        (undecayed if exempt else decayed).append(param)
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": undecayed, "weight_decay": 0.0}]
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


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """A fresh optimizer over ``model``'s trainable parameters, from a validated config."""
    groups = parameter_groups(model, config.weight_decay, config.decay_embeddings)
    return OPTIMIZERS.get(config.name)(
        groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay
    )
