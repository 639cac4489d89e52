"""The encoder's blocks other than attention: activations, norms, embeddings, MLPs, how a layer
wires them together, and the prediction head. Each registers itself under the name a config's
``model.blocks`` section picks it by.

A block declares the ``torch.compile`` region it forms (``compile_region``, see
:mod:`flexbert.core.model.compile`) and marks its residual output projection as a
:class:`~flexbert.core.model.init.ResidualProjection`, which initialisation scales down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from flexbert.core.model.attention import AttentionContext
from flexbert.core.model.config import Activation, FlexBertConfig, LayerType
from flexbert.core.model.init import ResidualProjection
from flexbert.core.model.registries import ATTENTION, EMBEDDINGS, HEAD, LAYER, MLP, NORM
from flexbert.typed_config import ConfigError, child_path

# --- activations: by the names transformers' configs use, so exports need no translation ----------

ACTIVATIONS: dict[Activation, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,  # exact erf form, as ModernBERT uses
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "relu": nn.ReLU,
}


def build_activation(name: Activation) -> nn.Module:
    return ACTIVATIONS[name]()


# --- normalisation over the hidden dimension ------------------------------------------------------


@NORM.register("layernorm")
class LayerNorm(nn.LayerNorm):
    """LayerNorm; biasless unless norm_bias (ModernBERT has none)."""

    compile_region = "norm"

    def __init__(self, config: FlexBertConfig):
        super().__init__(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


@NORM.register("rmsnorm")
class RMSNorm(nn.RMSNorm):
    """RMSNorm: scale only, no mean subtraction."""

    compile_region = "norm"

    def __init__(self, config: FlexBertConfig):
        super().__init__(config.hidden_size, eps=config.norm_eps)


def build_norm(config: FlexBertConfig) -> nn.Module:
    return NORM.get(config.blocks.norm)(config)


# --- token ids to the first hidden states ---------------------------------------------------------


@EMBEDDINGS.register("token")
class TokenEmbeddings(nn.Module):
    """Token lookup -> norm -> dropout, with no position embeddings (ModernBERT: RoPE does positions)."""

    def __init__(self, config: FlexBertConfig):
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.norm = build_norm(config)
        self.drop = nn.Dropout(config.embedding_dropout)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] -> [T, H]"""
        return self.drop(self.norm(self.embed(input_ids, positions)))


@EMBEDDINGS.register("learned_absolute")
class LearnedPositionEmbeddings(TokenEmbeddings):
    """Token lookup + learned absolute position (restarting per document) -> norm -> dropout."""

    def __init__(self, config: FlexBertConfig):
        super().__init__(config)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(input_ids) + self.position_embeddings(positions)


# --- per-token feed-forward sub-blocks ------------------------------------------------------------


class GatedMLP(nn.Module):
    """Wi: H -> 2I split into (input, gate); Wo(act(input) * gate)."""

    compile_region = "mlp"

    def __init__(self, config: FlexBertConfig, intermediate_size: int, activation: Activation):
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, 2 * intermediate_size, bias=config.mlp_bias)
        self.act = build_activation(activation)
        self.drop = nn.Dropout(config.mlp_dropout)
        self.Wo = ResidualProjection(intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., H] -> [..., H]"""
        input, gate = self.Wi(hidden).chunk(2, dim=-1)  # [..., I] each
        return self.Wo(self.drop(self.act(input) * gate))


@MLP.register("glu")
def glu_mlp(config: FlexBertConfig) -> GatedMLP:
    """Gated MLP (GeGLU with gelu): Wi: H -> 2I split into (input, gate); Wo(act(input) * gate)."""
    return GatedMLP(config, config.intermediate_size, config.hidden_activation)


@dataclass
class SwiGLUOptions:
    # The intermediate size is rounded up to a multiple of this (LLaMA uses 256), so that matrix
    # shapes suit the GPU's tiles whatever intermediate_size says.
    multiple_of: int = 1

    def validate(self, path: str) -> None:
        if self.multiple_of <= 0:
            raise ConfigError(child_path(path, "multiple_of"), f"must be positive, got {self.multiple_of}")


@MLP.register("swiglu", options=SwiGLUOptions)
def swiglu_mlp(config: FlexBertConfig, options: SwiGLUOptions) -> GatedMLP:
    """LLaMA's gated MLP: SiLU whatever hidden_activation says, with an intermediate size rounded up
    to a multiple of the option ``multiple_of``."""
    intermediate_size = -(-config.intermediate_size // options.multiple_of) * options.multiple_of
    return GatedMLP(config, intermediate_size, "silu")


@MLP.register("mlp")
class PlainMLP(nn.Module):
    """Classic BERT MLP: Wi: H -> I, activation, Wo: I -> H."""

    compile_region = "mlp"

    def __init__(self, config: FlexBertConfig):
        super().__init__()
        self.Wi = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.act = build_activation(config.hidden_activation)
        self.drop = nn.Dropout(config.mlp_dropout)
        self.Wo = ResidualProjection(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., H] -> [..., H]"""
        return self.Wo(self.drop(self.act(self.Wi(hidden))))


# --- encoder layers: how attention, MLP and norms are wired together ------------------------------


class EncoderLayer(nn.Module):
    def __init__(self, config: FlexBertConfig, layer_idx: int):
        super().__init__()
        # Which attention context the layer is given: global, or local within the window.
        self.layer_type: LayerType = config.layer_type(layer_idx)
        self.attn = ATTENTION.get(config.blocks.attention)(config, layer_idx)
        self.mlp = MLP.get(config.blocks.mlp)(config)


@LAYER.register("prenorm")
class PreNormLayer(EncoderLayer):
    """h += attn(attn_norm(h)); h += mlp(mlp_norm(h)). Layer 0 has no attn_norm: the embedding
    norm directly precedes it (ModernBERT)."""

    def __init__(self, config: FlexBertConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.attn_norm = nn.Identity() if layer_idx == 0 else build_norm(config)
        self.mlp_norm = build_norm(config)

    def forward(self, hidden: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        """hidden: [T, H] -> [T, H]"""
        hidden = hidden + self.attn(self.attn_norm(hidden), context)
        return hidden + self.mlp(self.mlp_norm(hidden))


@LAYER.register("postnorm")
class PostNormLayer(EncoderLayer):
    """h = attn_norm(h + attn(h)); h = mlp_norm(h + mlp(h)) (original BERT)."""

    def __init__(self, config: FlexBertConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.attn_norm = build_norm(config)
        self.mlp_norm = build_norm(config)

    def forward(self, hidden: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        """hidden: [T, H] -> [T, H]"""
        hidden = self.attn_norm(hidden + self.attn(hidden, context))
        return self.mlp_norm(hidden + self.mlp(hidden))


# --- the transform between the encoder's output and the vocabulary decoder ------------------------


@HEAD.register("mlm")
class PredictionHead(nn.Module):
    """norm(act(dense(h))), dense: H -> H."""

    compile_region = "head"

    def __init__(self, config: FlexBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.head_bias)
        self.act = build_activation(config.head_activation)
        self.norm = build_norm(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] -> [N, H]"""
        return self.norm(self.act(self.dense(hidden)))
