"""Multi-head self-attention over the unpadded stream, with rotary positions.

Rotary position embeddings use the GPT-NeoX rotate-half layout over the full head dim. Each layer
type ("global" or "local") has its own theta, so the model builds one :class:`AttentionContext` per
type and batch, which every layer of that type shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from flexbert.core.model.config import FlexBertConfig
from flexbert.core.model.init import ResidualProjection
from flexbert.core.model.layout import Attend
from flexbert.core.model.registries import ATTENTION


def rotary_inverse_frequencies(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/d), in fp32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponents)


class RotaryTables:
    """cos/sin tables per (theta, device), grown on demand.

    Keying on theta (read from the config at every forward) means a theta change, such as the
    context-extension phase's 160k global theta, takes effect at once: nothing stale is cached.
    """

    def __init__(self, head_dim: int):
        self.head_dim = head_dim
        self._tables: dict[tuple[float, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def lookup(self, positions: torch.Tensor, max_position: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, head_dim / 2] (fp32) at ``positions``, all of which are < max_position:
        the angles of the head's frequency pairs, which both halves of a head share."""
        key = (float(theta), positions.device)
        cos, sin = self._tables.get(key, (None, None))
        if cos is None or cos.shape[0] < max_position:
            length = 1 << max(max_position - 1, 1).bit_length()
            inv_freq = rotary_inverse_frequencies(self.head_dim, theta, positions.device)
            angles = torch.arange(length, device=positions.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
            cos, sin = angles.cos(), angles.sin()  # [length, head_dim / 2]
            self._tables[key] = (cos, sin)
        return cos[positions], sin[positions]


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """A new tensor: x turned by the angles whose cosines and sines are ``cos`` and ``sin``, two passes:
    ``[x1 cos - x2 sin, x2 cos + x1 sin]`` on the two halves of the last dim (rotate-half form).
    cos, sin broadcast against one half; turning by the opposite angle is ``sin`` negated."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out1, out2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin)
    return out


def _per_token(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[T, head_dim / 2] -> broadcastable against half of x: [T, 1, ..., head_dim / 2] in x's dtype."""
    return table.view(x.shape[0], *[1] * (x.dim() - 2), table.shape[-1]).to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, ..., head_dim] (e.g. [T, heads, head_dim]); cos, sin: [T, head_dim / 2].

    The rotate-half form, ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``,
    written on the two halves: ``[x1 cos - x2 sin, x2 cos + x1 sin]``."""
    cos, sin = _per_token(cos, x), _per_token(sin, x)
    if torch.is_grad_enabled() and x.requires_grad:
        return _RotaryTurn.apply(x, cos, sin)
    return _rotated(x, cos, sin)


class _RotaryTurn(torch.autograd.Function):
    """apply_rotary with gradients. A rotation's gradient is the opposite rotation of the output's
    gradient, so the backward pass is two passes over one fresh buffer. Autograd through the
    half-slices would zero-fill a buffer per slice and add them up."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotated(x, cos, sin)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        return _rotated(grad_out, cos, -sin), None, None


@dataclass(frozen=True)
class AttentionContext:
    """Per-batch inputs shared by every layer of one layer type (global or local)."""

    attend: Attend  # the backend kernel, with its document/window mask already built
    cos: torch.Tensor  # [T, head_dim / 2] rotary tables at each token's position, for this type's theta
    sin: torch.Tensor


class SelfAttention(nn.Module):
    """Fused Wqkv projection -> (RoPE) -> backend attention -> Wo -> dropout."""

    def __init__(self, config: FlexBertConfig, layer_idx: int, rotary: bool):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.rotary = rotary
        self.probs_dropout = config.attention_probs_dropout
        # Output rows are [Q of all heads | K of all heads | V of all heads], each head-contiguous.
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.Wo = ResidualProjection(config.hidden_size, config.hidden_size, bias=config.attention_bias)
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
def rotary_attention(config: FlexBertConfig, layer_idx: int) -> SelfAttention:
    """Self-attention with rotary position embeddings on q and k (ModernBERT)."""
    return SelfAttention(config, layer_idx, rotary=True)


@ATTENTION.register("plain")
def plain_attention(config: FlexBertConfig, layer_idx: int) -> SelfAttention:
    """Self-attention without positions of its own; pair it with learned_absolute embeddings."""
    return SelfAttention(config, layer_idx, rotary=False)
