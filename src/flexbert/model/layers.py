"""Encoder layers: how attention, MLP and norms are wired together."""

from __future__ import annotations

import torch
import torch.nn as nn

from flexbert.model.attention import AttentionContext
from flexbert.model.norms import build_norm
from flexbert.model.registries import ATTENTION, LAYER, MLP


class EncoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.is_global = config.is_global_layer(layer_idx)
        self.attn = ATTENTION.get(config.blocks.attention)(config, layer_idx)
        self.mlp = MLP.get(config.blocks.mlp)(config)


@LAYER.register("prenorm")
class PreNormLayer(EncoderLayer):
    """h += attn(attn_norm(h)); h += mlp(mlp_norm(h)). Layer 0 has no attn_norm: the embedding
    norm directly precedes it (ModernBERT)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.attn_norm = nn.Identity() if layer_idx == 0 else build_norm(config)
        self.mlp_norm = build_norm(config)

    def forward(self, hidden: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        hidden = hidden + self.attn(self.attn_norm(hidden), context)
        return hidden + self.mlp(self.mlp_norm(hidden))


@LAYER.register("postnorm")
class PostNormLayer(EncoderLayer):
    """h = attn_norm(h + attn(h)); h = mlp_norm(h + mlp(h)) (original BERT)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.attn_norm = build_norm(config)
        self.mlp_norm = build_norm(config)

    def forward(self, hidden: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        hidden = self.attn_norm(hidden + self.attn(hidden, context))
        return self.mlp_norm(hidden + self.mlp(hidden))
