"""Rotary position embeddings (GPT-NeoX rotate-half layout, over the full head dim)."""

from __future__ import annotations

import torch


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
        """cos, sin of shape [T, head_dim] (fp32) at ``positions``, all of which are < max_position."""
        key = (float(theta), positions.device)
        cos, sin = self._tables.get(key, (None, None))
        if cos is None or cos.shape[0] < max_position:
            length = 1 << max(max_position - 1, 1).bit_length()
            inv_freq = rotary_inverse_frequencies(self.head_dim, theta, positions.device)
            angles = torch.arange(length, device=positions.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
            angles = torch.cat((angles, angles), dim=-1)  # [length, head_dim]
            cos, sin = angles.cos(), angles.sin()
            self._tables[key] = (cos, sin)
        return cos[positions], sin[positions]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, ..., head_dim] (e.g. [T, heads, head_dim]); cos, sin: [T, head_dim]."""
    per_token = (x.shape[0], *[1] * (x.dim() - 2), x.shape[-1])
    cos = cos.view(per_token).to(x.dtype)
    sin = sin.view(per_token).to(x.dtype)
    return x * cos + rotate_half(x) * sin
