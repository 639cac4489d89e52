"""Sharded training through Composer's FSDP2 (torch's ``fully_shard``).

Parameters, gradients and optimizer state are split over the processes. Each encoder layer is one
sharding unit, gathered just before it runs and (with ``reshard_after_forward``) freed right after;
the rest (embeddings, final norm, head and the tied decoder) form the root unit. Composer asks the
ComposerModel's child for ``fsdp_wrap_fn`` and ``activation_checkpointing_fn``, so the training layer
sets both on the model instance: the model package itself knows nothing of sharding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from composer.utils.parallelism import FSDP2Config
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule

from flexbert.typed_config import ConfigError


@dataclass
class FSDPConfig:
    """The ``fsdp_config:`` section of a recipe."""

    reshard_after_forward: bool = True  # free a layer's gathered weights after its forward (ZeRO-3)
    activation_checkpointing: bool = False  # recompute each encoder layer in the backward pass
    state_dict_type: Literal["sharded", "full"] = "sharded"  # checkpoints: one shard per rank, or one file
    # Composer's: DEFAULT computes in the run's precision and reduces gradients in fp32; PURE also
    # reduces in it; FULL computes in fp32 (autocast still applies under amp_bf16).
    mixed_precision: Literal["DEFAULT", "PURE", "FULL"] = "DEFAULT"
    # HSDP: replicate over this many groups, sharding within each; 1 shards over every process.
    replicate_degree: int = 1

    def validate(self, path: str) -> None:
        if self.replicate_degree < 1:
            raise ConfigError(f"{path}.replicate_degree", f"must be at least 1, got {self.replicate_degree}")

    def check_world_size(self, path: str, world_size: int) -> None:
        if world_size % self.replicate_degree:
            raise ConfigError(
                f"{path}.replicate_degree",
                f"{self.replicate_degree} replicas cannot split {world_size} processes evenly",
            )


def composer_fsdp2_config(config: FSDPConfig, backend: str) -> FSDP2Config:
    """Composer's FSDP2 config for this section, on a 1-D mesh, or a 2-D (replicate, shard) one for
    HSDP. ``backend`` is the process group's: gloo cannot average over a replica group, so HSDP on
    it is refused here rather than failing inside the first backward pass."""
    mesh = None
    if config.replicate_degree > 1:
        if backend == "gloo":
            raise ConfigError(
                "fsdp_config.replicate_degree",
                f"HSDP (replicate_degree {config.replicate_degree}) "
                "needs NCCL: gloo, the CPU backend, cannot average gradients over a replica group "
                "(ReduceOp.AVG); use replicate_degree 1 here",
            )
        world = torch.distributed.get_world_size()
        mesh = init_device_mesh(
            "cuda", (config.replicate_degree, world // config.replicate_degree), mesh_dim_names=("replicate", "shard")
        )
    # Every key of the section but replicate_degree (the mesh) is Composer's own option, under its own name.
    options = {key: value for key, value in vars(config).items() if key != "replicate_degree"}
    return FSDP2Config(device_mesh=mesh, **options)


def mark_sharding_units(model: torch.nn.Module, layers: torch.nn.ModuleList) -> None:
    """Tell Composer's FSDP2 that each of ``layers`` is a sharding (and checkpointing) unit of
    ``model``, the ComposerModel's child."""
    units = {id(layer) for layer in layers}

    def is_unit(module: torch.nn.Module) -> bool:
        return id(module) in units

    model.fsdp_wrap_fn = is_unit
    model.activation_checkpointing_fn = is_unit


def gloo_averages_when_reduce_scattering() -> bool:
    """Whether gloo's ``reduce_scatter_tensor`` really averages under ``ReduceOp.AVG``: torch 2.7's
    sums instead, silently, so FSDP2's gradients on the CPU come out ``world_size`` times too large
    (one tiny collective, every rank)."""
    world = torch.distributed.get_world_size()
    output = torch.zeros(1)
    torch.distributed.reduce_scatter_tensor(output, torch.ones(world), op=torch.distributed.ReduceOp.AVG)
    return output.item() == 1.0


def average_gradients_over_gloo(model: torch.nn.Module) -> None:
    """Under gloo, where FSDP2's reduce-scatter sums gradients that it means to average (see
    :func:`gloo_averages_when_reduce_scattering`), divide each reduced gradient shard by the world
    size, so that sharded training on the CPU matches DDP. NCCL, on GPUs, averages as asked."""
    if gloo_averages_when_reduce_scattering():
        return
    world = torch.distributed.get_world_size()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_all_reduce_hook(lambda reduced: reduced.div_(world))
