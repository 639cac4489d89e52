"""Activation functions by the names transformers' configs use, so exports need no translation."""

from __future__ import annotations

import torch.nn as nn

ACTIVATIONS = {
    "gelu": nn.GELU,  # exact erf form, as ModernBERT uses
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "relu": nn.ReLU,
}


def build_activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()
