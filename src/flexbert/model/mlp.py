"""Per-token feed-forward sub-blocks."""

from __future__ import annotations

import torch
import torch.nn as nn

from flexbert.model.activations import build_activation
from flexbert.model.registries import MLP


@MLP.register("glu")
class GLUMLP(nn.Module):
    """Gated MLP (GeGLU with gelu): Wi: H -> 2I split into (input, gate); Wo(act(input) * gate)."""

    def __init__(self, config):
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.act = build_activation(config.hidden_activation)
        self.drop = nn.Dropout(config.mlp_dropout)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        input, gate = self.Wi(hidden).chunk(2, dim=-1)
        return self.Wo(self.drop(self.act(input) * gate))


@MLP.register("mlp")
class PlainMLP(nn.Module):
    """Classic BERT MLP: Wi: H -> I, activation, Wo: I -> H."""

    def __init__(self, config):
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.act = build_activation(config.hidden_activation)
        self.drop = nn.Dropout(config.mlp_dropout)
        self.Wo = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.Wo(self.drop(self.act(self.Wi(hidden))))
