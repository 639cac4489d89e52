"""FlashAttention-3's varlen kernel (Hopper GPUs): documents and windows handled inside the kernel."""

from __future__ import annotations

import torch

from flexbert.core.model.backends.flash import call_varlen
from flexbert.core.model.layout import Attend, DocumentLayout, flash3_available
from flexbert.core.model.registries import ATTENTION_BACKENDS


@ATTENTION_BACKENDS.register("flash3")
def prepare_flash3(layout: DocumentLayout, half_window: int | None, scale: float, causal: bool = False) -> Attend:
    """FlashAttention-3's varlen kernel (Hopper), global and sliding-window alike; 16-bit only, so
    fp32 inputs are computed in bf16. It has no dropout."""
    if not flash3_available():
        raise RuntimeError("attn_backend 'flash3' needs FlashAttention-3 (flash_attn_interface)")
    from flash_attn_interface import flash_attn_varlen_func

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        if dropout_p > 0:
            raise ValueError("FlashAttention-3 cannot drop attention probabilities; use sdpa or flash")
        return call_varlen(flash_attn_varlen_func, layout, half_window, scale, causal, q, k, v)

    return attend
