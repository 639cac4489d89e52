"""Multi-head self-attention over the unpadded stream, with rotary positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from flexbert.model.backends import Attend
from flexbert.model.registries import ATTENTION
from flexbert.model.rope import apply_rotary


@dataclass(frozen=True)
class AttentionContext:
    """Per-batch inputs shared by every layer of one attention type (global or local)."""

    attend: Attend  # the backend kernel, with its document/window mask already built
    cos: torch.Tensor  # [T, head_dim] rotary tables at each token's position, for this type's theta
    sin: torch.Tensor


class SelfAttention(nn.Module):
    """Fused Wqkv projection -> (RoPE) -> backend attention -> Wo -> dropout."""

    def __init__(self, config, layer_idx: int, rotary: bool):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.rotary = rotary
        self.probs_dropout = config.attention_probs_dropout
        # Output rows are [Q of all heads | K of all heads | V of all heads], each head-contiguous.
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        self.out_drop = nn.Dropout(config.attention_output_dropout)

    def forward(self, hidden: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        """hidden: [T, H] -> [T, H]"""
        qkv = self.Wqkv(hidden).view(-1, 3, self.num_heads, self.head_dim)  # [T, 3, heads, head_dim]
        if self.rotary:
            # Queries and keys rotate together: one pass over both instead of one each.
            q, k = apply_rotary(qkv[:, :2], context.cos, context.sin).unbind(dim=1)
            v = qkv[:, 2]
        else:
            q, k, v = qkv.unbind(dim=1)
        dropout_p = self.probs_dropout if self.training else 0.0
        out = context.attend(q, k, v, dropout_p)  # [T, heads, head_dim]
        return self.out_drop(self.Wo(out.flatten(1)))


@ATTENTION.register("rope")
def rotary_attention(config, layer_idx: int) -> SelfAttention:
    """Self-attention with rotary position embeddings on q and k (ModernBERT)."""
    return SelfAttention(config, layer_idx, rotary=True)


@ATTENTION.register("plain")
def plain_attention(config, layer_idx: int) -> SelfAttention:
    """Self-attention without positions of its own; pair it with learned_absolute embeddings."""
    return SelfAttention(config, layer_idx, rotary=False)
