"""Activation functions by the names transformers' configs use, so exports need no translation."""

from __future__ import annotations

import torch.nn as nn


def build_activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()  # exact erf form
    if name == "gelu_pytorch_tanh":
        return nn.GELU(approximate="tanh")
    if name == "silu":
        return nn.SiLU()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r}")
