"""One registry per block family of the encoder. The blocks register themselves on import."""

from __future__ import annotations

from flexbert.registry import Registry

EMBEDDINGS = Registry(
    "embeddings", "factory(config) -> module(input_ids[T], positions[T]) -> hidden[T, H]",
    "token ids to the first hidden states",
)
ATTENTION = Registry(
    "attention", "factory(config, layer_idx) -> module(hidden[T, H], context) -> hidden[T, H]",
    "the token-mixing sub-block of a layer",
)
MLP = Registry(
    "mlp", "factory(config) -> module(hidden[..., H]) -> hidden[..., H]",
    "the per-token feed-forward sub-block of a layer",
)
NORM = Registry(
    "norm", "factory(config) -> module(hidden[..., H]) -> hidden[..., H]",
    "normalisation over the hidden dimension",
)
LAYER = Registry(
    "layer", "factory(config, layer_idx) -> module(hidden[T, H], context) -> hidden[T, H]",
    "how attention, MLP and norms are wired into one encoder layer",
)
HEAD = Registry(
    "head", "factory(config) -> module(hidden[N, H]) -> hidden[N, H]",
    "the transform applied before the (tied) vocabulary decoder",
)
INIT = Registry(
    "init", "function(model, config) -> None",
    "parameter initialisation of a freshly built model",
)
LOSS = Registry(
    "loss", "factory(config) -> module(logits[N, V], labels[N]) -> scalar; optionally also "
    ".from_hidden(hidden[N, H], decoder, labels[N]) -> (scalar, predicted ids[N]) for training and "
    ".token_losses_from_hidden(...) -> (losses[N], predicted ids[N]) for evaluation, without whole logits",
    "the masked-language-modelling objective",
)
ATTENTION_BACKENDS = Registry(
    "attention_backend", "prepare(layout, half_window | None, scale) -> attend(q, k, v, dropout_p)",
    "kernels computing attention over an unpadded, packed token stream",
)

# The config slot (``model.blocks.<slot>``) that each registry fills.
BLOCK_REGISTRIES = {
    "embeddings": EMBEDDINGS,
    "attention": ATTENTION,
    "mlp": MLP,
    "norm": NORM,
    "layer": LAYER,
    "head": HEAD,
    "init": INIT,
    "loss": LOSS,
}
