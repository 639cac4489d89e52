"""Normalisation over the hidden dimension."""

from __future__ import annotations

import torch.nn as nn

from flexbert.model.registries import NORM


@NORM.register("layernorm")
def layer_norm(config) -> nn.Module:
    """LayerNorm; biasless unless norm_bias (ModernBERT has none)."""
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


@NORM.register("rmsnorm")
def rms_norm(config) -> nn.Module:
    """RMSNorm: scale only, no mean subtraction."""
    return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)


def build_norm(config) -> nn.Module:
    return NORM.get(config.blocks.norm)(config)
