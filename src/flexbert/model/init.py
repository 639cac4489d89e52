"""Parameter initialisation schemes."""

from __future__ import annotations

import math

import torch.nn as nn

from flexbert.model.registries import INIT


@INIT.register("modernbert")
def modernbert_init(model: nn.Module, config) -> None:
    """Truncated normal at ±cutoff·σ: σ = initializer_range for embeddings and input projections,
    σ/√(2·layers) for the residual output projections (every Linear named ``Wo``) and H^-0.5 for a
    task ``classifier``; norms at 1 and biases at 0."""
    std = config.initializer_range
    special = {"Wo": std / math.sqrt(2.0 * config.num_hidden_layers), "classifier": config.hidden_size**-0.5}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            sigma = special.get(name.rsplit(".", 1)[-1], std)
            nn.init.trunc_normal_(
                module.weight, mean=0.0, std=sigma,
                a=-config.initializer_cutoff_factor * sigma, b=config.initializer_cutoff_factor * sigma,
            )
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            nn.init.zeros_(bias)
