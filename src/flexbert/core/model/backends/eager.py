"""Plain softmax attention: the definition that every other backend must reproduce.

Document by document, every query is scored against every key of its document, local layers mask
the scores beyond the window, a causal model masks the keys after the query, and a softmax weighs
the values. Nothing is fused or skipped, so it
is slow (and it reads the document boundaries on the host), but it is what the tests hold the fast
kernels to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flexbert.core.model.layout import Attend, DocumentLayout
from flexbert.core.model.registries import ATTENTION_BACKENDS


@ATTENTION_BACKENDS.register("eager")
def prepare_eager(layout: DocumentLayout, half_window: int | None, scale: float, causal: bool = False) -> Attend:
    """Softmax attention document by document with an explicit score matrix: the semantics, and the
    oracle of the tests."""
    bounds = layout.cu_seqlens.tolist()

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        outputs = []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            qd, kd, vd = (x[start:end].transpose(0, 1) for x in (q, k, v))  # [heads, L, head_dim]
            scores = (qd @ kd.transpose(1, 2)) * scale  # [heads, L queries, L keys]
            position = torch.arange(end - start, device=q.device)
            behind = position[:, None] - position[None, :]  # [L queries, L keys]: i - j
            if half_window is not None:
                scores = scores.masked_fill(behind.abs() > half_window, float("-inf"))
            if causal:
                scores = scores.masked_fill(behind < 0, float("-inf"))
            probs = scores.softmax(-1)
            if dropout_p > 0:
                probs = F.dropout(probs, dropout_p)
            outputs.append((probs @ vd).transpose(0, 1))  # [L, heads, head_dim]
        return torch.cat(outputs)

    return attend
