"""Independent plain-PyTorch references that the optimised code is tested against."""

from __future__ import annotations

import torch


def reference_attention(q, k, v, cu_seqlens, half_window, scale):
    """Softmax attention computed document by document with an explicit score matrix.

    q, k, v: [T, heads, head_dim]; query i sees key j iff they share a document and, when
    half_window is not None, |i - j| <= half_window.
    """
    outputs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qd, kd, vd = (x[start:end].transpose(0, 1) for x in (q, k, v))  # [heads, L, d]
        scores = (qd @ kd.transpose(1, 2)) * scale
        if half_window is not None:
            idx = torch.arange(end - start)
            far = (idx[:, None] - idx[None, :]).abs() > half_window
            scores = scores.masked_fill(far, float("-inf"))
        outputs.append((scores.softmax(-1) @ vd).transpose(0, 1))
    return torch.cat(outputs)


def cu_seqlens_from_lengths(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
