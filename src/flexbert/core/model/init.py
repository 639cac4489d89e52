"""Parameter initialisation schemes, and the marks by which a block asks for a special one.

A block marks a projection by its class, not its attribute name, so a plugin's ``out_proj`` is
initialised as ModernBERT's ``Wo`` when it is a :class:`ResidualProjection`.
"""

from __future__ import annotations

import math

import torch.nn as nn

from flexbert.core.model.config import FlexBertConfig
from flexbert.core.model.registries import INIT


class ResidualProjection(nn.Linear):
    """A Linear whose output is added to the residual stream (attention's and the MLP's ``Wo``).
    Every layer adds two, so inits draw them smaller, lest the stream's variance grow with depth."""


class ClassifierProjection(nn.Linear):
    """A task head's final Linear, from hidden states to labels."""


@INIT.register("modernbert")
def modernbert_init(model: nn.Module, config: FlexBertConfig) -> None:
    """Truncated normal at ±cutoff·σ: σ = initializer_range for embeddings and input projections,
    σ/√(2·layers) for a ResidualProjection and H^-0.5 for a ClassifierProjection; norms at 1 and
    biases at 0."""
    std = config.initializer_range
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            sigma = std
            if isinstance(module, ResidualProjection):
                sigma = std / math.sqrt(2.0 * config.num_hidden_layers)
            elif isinstance(module, ClassifierProjection):
                sigma = config.hidden_size**-0.5
            nn.init.trunc_normal_(
                module.weight,
                mean=0.0,
                std=sigma,
                a=-config.initializer_cutoff_factor * sigma,
                b=config.initializer_cutoff_factor * sigma,
            )
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            nn.init.zeros_(bias)
