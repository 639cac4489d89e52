"""Initialise a larger FlexBERT from a smaller one by centre tiling with wraparound.

ModernBERT-large started from ModernBERT-base's weights tiled into its larger shapes, which trains
faster than a random start (ModernBERT, appendix A.2). The rule, on the masked-LM state dict:

* **Depth** (Gopher's layer scaling): large layer ``i`` copies small layer
  ``min(round(i * L_small / L_large), L_small - 1)``. ``round`` is Python's, which rounds halves to
  even, as the reference implementation does (base -> large, 22 -> 28 layers: layer 21 copies 16,
  where rounding halves up would give 17). The clamp matters once ``L_large >= 2 * L_small``, where
  the last layer would round to ``L_small``.
* **Width**: every tensor sits at the centre of the larger one, at offset ``(new - old) // 2`` along
  each dimension, and wraps around past its edges: cells after its end continue cyclically from its
  start, cells before its start continue cyclically backwards from its end. Per dimension,
  ``large[j] = small[(j - offset) mod old]``. The dimensions are independent, so tiling a matrix's
  columns first and then its rows, as the reference does, gives the same matrix as the other order.
* **Fused projections** are tiled part by part, so that each part stays itself: attention's
  ``Wqkv`` as Q, K and V, and a gated MLP's ``Wi`` as input and gate (their biases alike). A plain
  MLP's ``Wi`` is one part.
* **Embeddings** are tiled along the hidden dimension only: the vocabulary must be the same. The
  decoder's weight is tied to them and follows; norms, the head and the decoder bias are tiled like
  any tensor.
* **A norm the source layer lacks** (a pre-norm model's layer 0 has no attention norm: the
  embedding norm precedes it) is made fresh in the large layer that copies it: weight 1, bias 0, as
  initialisation sets it.
* **The encoder's final norm** is the large model's own, fresh (weight 1, bias 0), not the small
  one's tiled: the reference implementation tiles the embeddings, the layers, the head and the
  decoder bias, and leaves ``final_norm`` as initialisation made it.

The two configs must choose the same blocks and bias flags, so that the state dicts have the same
keys, and the large one may be no smaller in any dimension.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace

import torch
import torch.nn as nn
from torch import Tensor

from flexbert.core.model.attention import SelfAttention
from flexbert.core.model.blocks import GatedMLP
from flexbert.core.model.config import FlexBertConfig
from flexbert.core.model.model import FlexBertForMaskedLM
from flexbert.errors import FlexBertError

# Fused projections by the block that owns them: the attribute, and how many row blocks it stacks.
FUSED_PROJECTIONS: tuple[tuple[type[nn.Module], str, int], ...] = ((SelfAttention, "Wqkv", 3), (GatedMLP, "Wi", 2))

# Sizes that tiling may grow but never shrink.
GROWABLE_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers")

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


class TilingError(FlexBertError, ValueError):
    """The small model cannot be tiled into the large one."""


# --- one tensor -----------------------------------------------------------------------------------


def tile_tensor(small: Tensor, shape: Sequence[int]) -> Tensor:
    """Centre ``small`` in a tensor of ``shape`` (same number of dims, none smaller), wrapping around
    its edges: ``large[j] = small[(j - offset) mod old]`` per dimension, offset ``(new - old) // 2``."""
    if small.dim() != len(shape):
        raise TilingError(f"cannot tile a {small.dim()}-D tensor into shape {tuple(shape)}")
    tiled = small
    # Last dimension first (a matrix's columns, then its rows), as the reference; each dimension is
    # gathered independently of the others, so any order gives the same tensor.
    for dim in reversed(range(small.dim())):
        tiled = _tile_along(tiled, dim, shape[dim])
    return tiled


def _tile_along(small: Tensor, dim: int, new: int) -> Tensor:
    old = small.shape[dim]
    if new < old:
        raise TilingError(f"cannot tile size {old} into the smaller {new} along dimension {dim}")
    offset = (new - old) // 2
    # Floor modulo: positions before the offset count backwards from the end.
    index = (torch.arange(new, device=small.device) - offset) % old  # [new]
    return small.index_select(dim, index)


def tile_parts(small: Tensor, shape: Sequence[int], parts: int = 1) -> Tensor:
    """``small`` [parts * rows, ...] stacks ``parts`` row blocks (Wqkv [Q|K|V, H]: 3); each is tiled on
    its own into [shape[0] / parts, ...], so that the large Q holds the small Q, not a mix of Q and K."""
    part_shape = (shape[0] // parts, *shape[1:])
    return torch.cat([tile_tensor(part, part_shape) for part in small.chunk(parts, dim=0)], dim=0)


# --- the whole model ------------------------------------------------------------------------------


def source_layer(layer: int, small_layers: int, large_layers: int) -> int:
    """The small layer that large ``layer`` copies: round(layer * L_small / L_large), halves to even
    (Python's round, as the reference), clamped below L_small."""
    return min(round(layer * small_layers / large_layers), small_layers - 1)


# The encoder's final norm, which the large model keeps fresh (see the module docstring).
FINAL_NORM = "model.final_norm."


def _fresh_norm(key: str, shape: torch.Size, small: Mapping[str, Tensor]) -> Tensor:
    """A norm's weight (ones) or bias (zeros) as initialisation sets them, like the small weights."""
    like = next(iter(small.values()))
    return torch.full(shape, 1.0 if key.endswith(".weight") else 0.0, dtype=like.dtype, device=like.device)


def tile_state_dict(
    small: Mapping[str, Tensor], small_config: FlexBertConfig, large_config: FlexBertConfig
) -> dict[str, Tensor]:
    """The state dict of ``FlexBertForMaskedLM(large_config)``, tiled from the small model's (see the
    module docstring for the rule). Tensors keep the small ones' dtype and device; the decoder weight
    is the embeddings' tensor itself, as in the model."""
    _check_configs(small_config, large_config)
    with torch.device("meta"):  # shapes and module types only: no memory, no init cost
        large = FlexBertForMaskedLM(replace(large_config, compile_regions=[]))
    fused = _fused_parts(large)
    layers = [
        source_layer(i, small_config.num_hidden_layers, large_config.num_hidden_layers)
        for i in range(large_config.num_hidden_layers)
    ]
    tiled: dict[str, Tensor] = {}
    by_target: dict[int, Tensor] = {}  # id of the large model's tensor -> its tiled value, for ties
    used: set[str] = set()
    for key, target in large.state_dict(keep_vars=True).items():
        source = _source_key(key, layers)
        if id(target) in by_target:  # tied (the decoder to the embeddings): the same tensor again
            tiled[key] = by_target[id(target)]
        elif key.startswith(FINAL_NORM):
            tiled[key] = _fresh_norm(key, target.shape, small)
        elif source in small:
            tiled[key] = tile_parts(small[source], target.shape, fused.get(key, 1))
        elif _is_missing_layer_norm(large, key, source, small):
            tiled[key] = _fresh_norm(key, target.shape, small)
        else:
            raise TilingError(f"the small weights have no {source} for the large model's {key}")
        by_target[id(target)] = tiled[key]
        used.add(source)
    unused = sorted(key for key in small.keys() - used if not key.startswith(FINAL_NORM))
    if unused:
        raise TilingError(f"the large model has no place for the small weights' {', '.join(unused)}")
    return tiled


def tile_into(
    model: FlexBertForMaskedLM, small_weights: Mapping[str, Tensor], small_config: FlexBertConfig
) -> FlexBertForMaskedLM:
    """Load into a freshly built large ``model`` the small weights tiled to its config; returns it."""
    model.load_state_dict(tile_state_dict(small_weights, small_config, model.config), strict=True)
    return model


def _check_configs(small: FlexBertConfig, large: FlexBertConfig) -> None:
    if large.vocab_size != small.vocab_size:
        raise TilingError(
            f"vocab_size: the large model's {large.vocab_size} differs from the small model's "
            f"{small.vocab_size}; tiling keeps the vocabulary"
        )
    for size in GROWABLE_SIZES:
        if getattr(large, size) < getattr(small, size):
            raise TilingError(
                f"{size}: the large model's {getattr(large, size)} is smaller than the small model's "
                f"{getattr(small, size)}"
            )
    for slot in fields(small.blocks):
        small_block, large_block = getattr(small.blocks, slot.name), getattr(large.blocks, slot.name)
        if large_block != small_block:
            raise TilingError(
                f"blocks.{slot.name}: the large model's {large_block!r} differs from the small model's {small_block!r}"
            )


def _fused_parts(model: nn.Module) -> dict[str, int]:
    """State-dict key -> number of stacked parts, for the parameters of fused projections."""
    parts = {}
    for name, module in model.named_modules():
        for owner, attribute, count in FUSED_PROJECTIONS:
            if isinstance(module, owner):
                for parameter, _ in getattr(module, attribute).named_parameters():
                    parts[f"{name}.{attribute}.{parameter}"] = count
    return parts


def _source_key(key: str, layers: Sequence[int]) -> str:
    """The small model's key a large key is tiled from: the same, in the source layer."""
    return LAYER_KEY.sub(lambda match: f"model.layers.{layers[int(match.group(1))]}.", key)


def _is_missing_layer_norm(large: nn.Module, key: str, source: str, small: Mapping[str, Tensor]) -> bool:
    """Whether ``key`` belongs to a norm of a large layer whose source layer has no such norm at all
    (not merely a norm without bias: that is a different config, and refused)."""
    module = large.get_submodule(key.rpartition(".")[0])
    source_module = source.rpartition(".")[0] + "."
    return (
        LAYER_KEY.match(key) is not None
        and isinstance(module, (nn.LayerNorm, nn.RMSNorm))
        and not any(name.startswith(source_module) for name in small)
    )
