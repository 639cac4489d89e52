"""The transform between the encoder's output and the vocabulary decoder."""

from __future__ import annotations

import torch
import torch.nn as nn

from flexbert.model.activations import build_activation
from flexbert.model.norms import build_norm
from flexbert.model.registries import HEAD


@HEAD.register("mlm")
class PredictionHead(nn.Module):
    """norm(act(dense(h))), dense: H -> H."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.head_bias)
        self.act = build_activation(config.head_activation)
        self.norm = build_norm(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden)))
