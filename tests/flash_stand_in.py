"""Stand-ins for flash-attn 2 (``flash_attn``) and FlashAttention-3 (``flash_attn_interface``): their
varlen functions, written in plain PyTorch from the libraries' documented signatures and semantics, so
that every path of ours that calls them runs, forward and backward, on a CPU.

Each refuses what the real kernel refuses, so that a wrong call fails here as it would on a GPU:
inputs other than fp16/bf16, mixed dtypes, ``cu_seqlens`` other than int32 on the inputs' device,
``max_seqlen`` as a tensor rather than a host int, a window that is not a pair of ints, and arguments
the function does not take (FlashAttention-3 takes no ``dropout_p``). The math follows the
documentation, not our code: per document, softmax(q kᵀ · softmax_scale) v, the scale defaulting to
head_dim^-0.5, and with ``window_size=(left, right)`` query i seeing keys i - left … i + right
(inclusive, -1 meaning unbounded; documents of equal query and key lengths).
"""

from __future__ import annotations

import importlib.machinery
import types

import torch

CALLS: list[dict] = []  # every call's arguments, for tests to inspect


def _check_arguments(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"FlashAttention only supports fp16 and bf16 data type, got {q.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise RuntimeError("query, key and value must have the same dtype")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise RuntimeError("varlen inputs are [total_tokens, heads, head_dim]")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not torch.is_tensor(cu) or cu.dtype != torch.int32 or cu.device != q.device or cu.dim() != 1:
            raise RuntimeError(f"{name} must be a 1-D int32 tensor on the inputs' device")
    for name, longest in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if type(longest) is not int:
            raise TypeError(f"{name} must be a Python int, got {type(longest).__name__}")
    if not (isinstance(window_size, tuple | list) and len(window_size) == 2):
        raise TypeError(f"window_size must be a (left, right) pair, got {window_size!r}")
    if not all(type(side) is int for side in window_size):
        raise TypeError(f"window_size must hold ints, got {window_size!r}")


def _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale, causal, window_size):
    """The documented result, document by document, in fp32, returned in the inputs' dtype."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    left, right = window_size
    outputs = []
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(starts_q, starts_q[1:]), zip(starts_k, starts_k[1:])):
        if q1 - q0 > max_seqlen_q:
            raise RuntimeError("a document is longer than max_seqlen_q")
        qd, kd, vd = (x.float().transpose(0, 1) for x in (q[q0:q1], k[k0:k1], v[k0:k1]))  # [heads, n, d]
        scores = qd @ kd.transpose(1, 2) * scale
        i = torch.arange(q1 - q0, device=q.device)[:, None] + (k1 - k0) - (q1 - q0)
        j = torch.arange(k1 - k0, device=q.device)[None, :]
        allowed = torch.ones_like(scores[0], dtype=torch.bool)
        if left >= 0:
            allowed &= j >= i - left
        if right >= 0:
            allowed &= j <= i + right
        if causal:
            allowed &= j <= i
        probabilities = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        outputs.append((probabilities @ vd).transpose(0, 1))
    return torch.cat(outputs).to(q.dtype)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """flash-attn 2.x's ``flash_attn_varlen_func``."""
    _check_arguments(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size)
    CALLS.append({"library": "flash_attn", "dropout_p": dropout_p, "window_size": tuple(window_size), "causal": causal})
    if dropout_p > 0 and torch.is_grad_enabled():
        raise NotImplementedError("the stand-in computes without dropout; tests call it with dropout_p=0")
    return _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale, causal, window_size)


def flash3_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    seqused_q=None,
    seqused_k=None,
    softmax_scale=None,
    causal=False,
    qv=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    window_size=(-1, -1),
    attention_chunk=0,
    softcap=0.0,
    num_splits=1,
    pack_gqa=None,
    deterministic=False,
    sm_margin=0,
    return_attn_probs=False,
):
    """FlashAttention-3's ``flash_attn_interface.flash_attn_varlen_func`` (no dropout; some releases
    also return the log-sum-exp, as this one does)."""
    _check_arguments(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size)
    CALLS.append({"library": "flash_attn_interface", "window_size": tuple(window_size), "causal": causal})
    out = _varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale, causal, window_size)
    return out, torch.zeros(q.shape[1], q.shape[0], device=q.device)


def modules() -> dict[str, types.ModuleType]:
    """``flash_attn`` and ``flash_attn_interface`` as importable modules (``find_spec`` finds them)."""
    made = {}
    for name, function in (("flash_attn", flash_attn_varlen_func), ("flash_attn_interface", flash3_attn_varlen_func)):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        module.flash_attn_varlen_func = function
        made[name] = module
    return made
