"""flash-attn 2's varlen kernel (CUDA): documents and windows handled inside the kernel."""

from __future__ import annotations

from collections.abc import Callable

import torch

from flexbert.core.model.layout import Attend, DocumentLayout, flash_attn_available
from flexbert.core.model.registries import ATTENTION_BACKENDS


def call_varlen(
    kernel: Callable,
    layout: DocumentLayout,
    half_window: int | None,
    scale: float,
    causal: bool,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    **options,
) -> torch.Tensor:
    """flash-attn's varlen interface, which FlashAttention 2 and 3 share: [T, heads, head_dim] in 16-bit
    (fp32 inputs are computed in bf16), each document attending within itself, local layers within
    ``(half_window, half_window)``, a causal model's keys only up to the query (the kernel's
    ``causal``, whose window then reaches no key to the right). Returns the output in the inputs' dtype."""
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    reach = -1 if half_window is None else half_window
    window = (reach, 0 if causal else reach)
    cu, longest = layout.cu_seqlens, layout.max_seqlen
    out = kernel(
        q.to(dtype),
        k.to(dtype),
        v.to(dtype),
        cu,
        cu,
        longest,
        longest,
        softmax_scale=scale,
        causal=causal,
        window_size=window,
        **options,
    )
    out = out[0] if isinstance(out, tuple) else out  # some FA3 releases also return the log-sum-exp
    return out.to(q.dtype)


@ATTENTION_BACKENDS.register("flash")
def prepare_flash(layout: DocumentLayout, half_window: int | None, scale: float, causal: bool = False) -> Attend:
    """flash-attn 2 varlen kernel; computes in bf16 when given fp32 (it supports only 16-bit)."""
    if not flash_attn_available():
        raise RuntimeError("attn_backend 'flash' needs the flash-attn package (flexbert[gpu])")
    from flash_attn import flash_attn_varlen_func

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        return call_varlen(flash_attn_varlen_func, layout, half_window, scale, causal, q, k, v, dropout_p=dropout_p)

    return attend
