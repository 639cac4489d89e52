"""Masked-language-modelling objectives."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexbert.model.registries import LOSS

IGNORE_INDEX = -100


@LOSS.register("cross_entropy")
class MaskedCrossEntropy(nn.Module):
    """Mean cross-entropy over positions whose label is not -100."""

    def __init__(self, config):
        super().__init__()

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
