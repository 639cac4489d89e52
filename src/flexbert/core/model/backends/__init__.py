"""Attention kernels over the unpadded token stream, behind one interface.

The encoder never sees padding. A batch is a flat stream of T real tokens holding one or more
documents back to back; a :class:`DocumentLayout` says where each one starts. A backend's
``prepare(layout, half_window, scale)`` runs once per batch and layer type, building whatever mask
or index its kernel needs, and returns ``attend(q, k, v, dropout_p)``, which every layer of that
type then calls. ``q, k, v`` and the result are ``[T, heads, head_dim]``.

Semantics shared by all backends, and spelled out by the ``eager`` one: query token i attends to
key j iff both lie in the same document and, for local layers, ``|i - j| <= half_window``.

One module per kernel: eager (the definition), sdpa, flex, flash (flash-attn 2), flash3.
"""

from __future__ import annotations

import torch

# Each kernel registers itself in ATTENTION_BACKENDS when imported.
from flexbert.core.model.backends import eager, flash, flash3, flex, sdpa  # noqa: F401
from flexbert.core.model.layout import flash3_available, flash_attn_available


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto`` means the fastest kernel that can run here: FlashAttention-3 on Hopper (compute
    capability 9) where it is installed, then flash-attn 2, then FlexAttention on other GPUs, and
    SDPA elsewhere."""
    if name != "auto":
        return name
    if device.type == "cuda":
        if flash3_available() and torch.cuda.get_device_capability(device)[0] == 9:
            return "flash3"
        return "flash" if flash_attn_available() else "flex"
    return "sdpa"
