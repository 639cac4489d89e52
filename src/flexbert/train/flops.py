"""Model FLOPs of a training step: the numerator of MFU.

A weight used once per token costs 2 FLOPs forward and 4 backward, so a training step costs three
forward passes. Per real token of a document of length S (the spec's "Efficiency anchors"):

    6·L·(4H² + W_mlp)                                  projections: Wqkv, Wo and the MLP's matrices
  + 12·H·(n_global·S + n_local·min(window + 1, S))    attention scores and weighted values
  + 6·p·(H² + V·H)                                     head dense and decoder, on predicted tokens

W_mlp is 3HI for a GLU (Wi: H→2I, Wo: I→H) and 2HI for a plain MLP. S is the length of the
document a token attends within, never the packed row it shares. A causal model's queries see only
the keys up to themselves: token i of a document sees i + 1 keys in a global layer and
min(i, window / 2) + 1 in a local one, which is what the kernels compute. p is the fraction of tokens with
a label under sparse prediction, and 1 otherwise. Embedding lookups, norms and activations are left
out, as is usual for MFU.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flexbert.core.model.config import FlexBertConfig
from flexbert.core.model.losses import IGNORE_INDEX
from flexbert.core.model.registries import MLP

# Dense bf16 tensor-core peaks per device, TFLOP/s, from NVIDIA's datasheets (the sparse figures
# there are twice these). A device matches the first entry whose words all occur in its name.
GPU_PEAK_TFLOPS: tuple[tuple[frozenset[str], float], ...] = (
    (frozenset({"h100", "pcie"}), 756.0),
    (frozenset({"h100"}), 989.0),  # SXM
    (frozenset({"h200"}), 989.0),
    (frozenset({"a100"}), 312.0),
    (frozenset({"l40s"}), 362.0),
    (frozenset({"l4"}), 121.0),
)


def gpu_peak_flops(device_name: str) -> float | None:
    """Peak FLOP/s of a GPU named like ``torch.cuda.get_device_name()``, or None if unknown."""
    words = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    for required, tflops in GPU_PEAK_TFLOPS:
        if required <= words:
            return tflops * 1e12
    return None


@dataclass(frozen=True)
class TrainingFlops:
    """The formula's coefficients for one model, in FLOPs."""

    per_token: int  # 6·L·(4H² + W_mlp)
    per_query_key: int  # 12·H: one query scored against, and reading, one key in one layer
    global_layers: int
    local_layers: int
    local_keys: int  # window + 1: both ends of |i - j| <= window / 2 are seen
    per_prediction: int  # 6·(H² + V·H)
    sparse_prediction: bool
    causal: bool = False  # keys after the query are never scored

    @classmethod
    def of(cls, config: FlexBertConfig) -> TrainingFlops:
        hidden, layers = config.hidden_size, config.num_hidden_layers
        global_layers = sum(config.is_global_layer(i) for i in range(layers))
        return cls(
            per_token=6 * layers * (4 * hidden**2 + _mlp_weights(config)),
            per_query_key=12 * hidden,
            global_layers=global_layers,
            local_layers=layers - global_layers,
            local_keys=config.local_attention + 1,
            per_prediction=6 * (hidden**2 + config.vocab_size * hidden),
            sparse_prediction=config.sparse_prediction,
            causal=config.causal,
        )

    def _scored_pairs(self, lengths: np.ndarray) -> np.ndarray:
        """Per document of each length S, the (query, key) pairs scored over all layers."""
        if not self.causal:
            # Each of S queries sees S keys in a global layer and min(window + 1, S) in a local one.
            return (self.global_layers * lengths + self.local_layers * np.minimum(lengths, self.local_keys)) * lengths
        # Query i sees i + 1 keys globally; locally min(i, window/2) + 1, which grows up to the
        # query reach = window/2 + 1 and stays there.
        reach = self.local_keys // 2 + 1
        near = np.minimum(lengths, reach)
        local = near * (near + 1) // 2 + (lengths - near) * reach
        return self.global_layers * lengths * (lengths + 1) // 2 + self.local_layers * local

    def per_token_at(self, doc_len: int, masked_fraction: float) -> float:
        """FLOPs per token when every document is ``doc_len`` tokens long."""
        keys = int(self._scored_pairs(np.array([doc_len], dtype=np.int64))[0]) / doc_len
        predicted = masked_fraction if self.sparse_prediction else 1.0
        return self.per_token + self.per_query_key * keys + predicted * self.per_prediction

    def of_batch(self, cu_seqlens: Sequence[int] | np.ndarray, num_labelled: int) -> float:
        """Exact FLOPs of one unpadded batch, summed document by document, from host values alone
        (a batch's ``host_cu_seqlens`` and its count of labelled tokens), so that a training loop
        can count them without touching the device."""
        cu_seqlens = np.asarray(cu_seqlens, dtype=np.int64)
        keys = self._scored_pairs(np.diff(cu_seqlens))
        tokens = int(cu_seqlens[-1] - cu_seqlens[0])
        predicted = num_labelled if self.sparse_prediction else tokens
        return float(self.per_token * tokens + self.per_query_key * int(keys.sum()) + self.per_prediction * predicted)


def _mlp_weights(config: FlexBertConfig) -> int:
    """Weights in one layer's MLP matrices, read off the registered block itself, so a GLU (3HI),
    a plain MLP (2HI) or a plugin block is counted by what it actually multiplies."""
    with torch.device("meta"):
        mlp = MLP.get(config.blocks.mlp)(config)
    return sum(p.numel() for p in mlp.parameters() if p.dim() >= 2)


def training_flops_per_token(config: FlexBertConfig, doc_len: int, masked_fraction: float) -> float:
    """Training FLOPs per real token when every document is ``doc_len`` tokens long and a
    ``masked_fraction`` of tokens is predicted (ignored without sparse prediction)."""
    return TrainingFlops.of(config).per_token_at(doc_len, masked_fraction)


def batch_training_flops(config: FlexBertConfig, cu_seqlens: torch.Tensor, labels: torch.Tensor) -> float:
    """Training FLOPs of one unpadded batch given as CPU tensors (``cu_seqlens`` [docs + 1],
    ``labels`` [T], -100 where not predicted)."""
    return TrainingFlops.of(config).of_batch(cu_seqlens.numpy(), int((labels != IGNORE_INDEX).sum()))
