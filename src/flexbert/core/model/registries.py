"""One registry per block family of the encoder. The blocks register themselves on import.

Each family's Protocol is the call that the model makes to build a block; its docstring says what
the built module computes, and ``flexbert registry`` prints both. A block with options of its own
is registered with ``options=SomeDataclass`` and built as ``factory(config, ..., options=...)``;
the registry binds them, so every block of a family is then called alike.
"""

from __future__ import annotations

from typing import Protocol

import torch.nn as nn

from flexbert.core.model.config import FlexBertConfig
from flexbert.core.model.layout import Attend, DocumentLayout
from flexbert.registry import Registry


class EmbeddingsFactory(Protocol):
    """module(input_ids[T], positions[T]) -> hidden[T, H]"""

    def __call__(self, config: FlexBertConfig) -> nn.Module: ...


class AttentionFactory(Protocol):
    """module(hidden[T, H], context) -> hidden[T, H]"""

    def __call__(self, config: FlexBertConfig, layer_idx: int) -> nn.Module: ...


class MLPFactory(Protocol):
    """module(hidden[..., H]) -> hidden[..., H]"""

    def __call__(self, config: FlexBertConfig) -> nn.Module: ...


class NormFactory(Protocol):
    """module(hidden[..., H]) -> hidden[..., H]"""

    def __call__(self, config: FlexBertConfig) -> nn.Module: ...


class LayerFactory(Protocol):
    """module(hidden[T, H], context) -> hidden[T, H], with ``layer_type`` set ("global" or "local")"""

    def __call__(self, config: FlexBertConfig, layer_idx: int) -> nn.Module: ...


class HeadFactory(Protocol):
    """module(hidden[N, H]) -> hidden[N, H]"""

    def __call__(self, config: FlexBertConfig) -> nn.Module: ...


class InitFunction(Protocol):
    """None, the parameters of ``model`` set in place"""

    def __call__(self, model: nn.Module, config: FlexBertConfig) -> None: ...


class LossFactory(Protocol):
    """module(logits[N, V], labels[N]) -> scalar; optionally also .from_hidden(hidden[N, H], decoder,
    labels[N]) -> (scalar, predicted ids[N]) for training and .token_losses_from_hidden(...) ->
    (losses[N], predicted ids[N]) for evaluation, without whole logits"""

    def __call__(self, config: FlexBertConfig) -> nn.Module: ...


class AttentionBackend(Protocol):
    """attend(q, k, v, dropout_p), each [T, heads, head_dim]. Query i of a document sees key j of
    the same document where ``|i - j| <= half_window`` (every j when None); ``causal`` keeps only
    ``j <= i``, a decoder's mask."""

    def __call__(
        self, layout: DocumentLayout, half_window: int | None, scale: float, causal: bool = False
    ) -> Attend: ...


EMBEDDINGS = Registry("embeddings", EmbeddingsFactory, "token ids to the first hidden states")
ATTENTION = Registry("attention", AttentionFactory, "the token-mixing sub-block of a layer")
MLP = Registry("mlp", MLPFactory, "the per-token feed-forward sub-block of a layer")
NORM = Registry("norm", NormFactory, "normalisation over the hidden dimension")
LAYER = Registry("layer", LayerFactory, "how attention, MLP and norms are wired into one encoder layer")
HEAD = Registry("head", HeadFactory, "the transform applied before the (tied) vocabulary decoder")
INIT = Registry("init", InitFunction, "parameter initialisation of a freshly built model")
LOSS = Registry("loss", LossFactory, "the masked-language-modelling objective")
ATTENTION_BACKENDS = Registry(
    "attention_backend", AttentionBackend, "kernels computing attention over an unpadded, packed token stream"
)

# The config slot (``model.blocks.<slot>``) that each registry fills.
BLOCK_REGISTRIES: dict[str, Registry] = {
    "embeddings": EMBEDDINGS,
    "attention": ATTENTION,
    "mlp": MLP,
    "norm": NORM,
    "layer": LAYER,
    "head": HEAD,
    "init": INIT,
    "loss": LOSS,
}
