"""The FlexBERT model config: one typed dataclass, presets, and validation by key path."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from flexbert.core.model.compile import CompileRegion
from flexbert.core.model.layout import flash3_available, flash_attn_available
from flexbert.registry import CATALOGUE, import_plugins, split_choice
from flexbert.typed_config import ConfigError, child_path, from_dict

# By the names transformers' configs use, so exports need no translation.
Activation = Literal["gelu", "gelu_pytorch_tanh", "silu", "relu"]

# Global layers attend across whole documents; local ones within a window.
LayerType = Literal["global", "local"]

# What the model learns to predict: "mlm", masked tokens from both sides (an encoder, ModernBERT);
# "clm", every next token from the tokens before it (a decoder, as Ettin trains the same architecture).
Objective = Literal["mlm", "clm"]

# A registered block by name, or a mapping of its name and options of its own:
# ``{name: swiglu, multiple_of: 256}``. Kept as written, so ``dataclasses.asdict`` gives back what
# ``from_dict`` reads.
BlockChoice = str | dict[str, Any]


@dataclass
class BlocksConfig:
    """Which registered block fills each slot of the encoder (see ``flexbert registry``)."""

    embeddings: BlockChoice = "token"
    attention: BlockChoice = "rope"
    mlp: BlockChoice = "glu"
    norm: BlockChoice = "layernorm"
    layer: BlockChoice = "prenorm"
    head: BlockChoice = "mlm"
    init: BlockChoice = "modernbert"
    loss: BlockChoice = "cross_entropy"


@dataclass
class FlexBertConfig:
    """Hyper-parameters of a FlexBERT encoder. Defaults are ModernBERT-base."""

    vocab_size: int = 50368
    hidden_size: int = 768
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    intermediate_size: int = 1152
    max_position_embeddings: int = 8192
    hidden_activation: Activation = "gelu"
    head_activation: Activation = "gelu"
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    head_bias: bool = False
    decoder_bias: bool = True
    final_norm: bool = True
    embedding_dropout: float = 0.0
    attention_probs_dropout: float = 0.0
    attention_output_dropout: float = 0.0
    mlp_dropout: float = 0.0
    objective: Objective = "mlm"  # "clm" makes every attention layer causal: query i sees keys j <= i
    # Layer i attends globally iff i % global_attn_every_n_layers == 0; the others see a window of
    # local_attention tokens: |i - j| <= local_attention // 2 (and j <= i under clm).
    global_attn_every_n_layers: int = 3
    local_attention: int = 128
    global_rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0
    pad_token_id: int = 50283
    cls_token_id: int = 50281
    sep_token_id: int = 50282
    sparse_prediction: bool = True
    # Training computes the MLM loss this many predicted tokens at a time, never holding all logits.
    loss_chunk_tokens: int = 4096
    # "auto" or a registered attention backend (``flexbert registry attention_backend``).
    attn_backend: str = "auto"
    # Submodules run through torch.compile (see flexbert.core.model.compile).
    compile_regions: list[CompileRegion] = field(default_factory=list)
    blocks: BlocksConfig = field(default_factory=BlocksConfig)
    # Modules imported before blocks are looked up, so user blocks can register themselves.
    plugins: list[str] = field(default_factory=list)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_type(self, layer_idx: int) -> LayerType:
        return "global" if layer_idx % self.global_attn_every_n_layers == 0 else "local"

    def is_global_layer(self, layer_idx: int) -> bool:
        return self.layer_type(layer_idx) == "global"

    @property
    def causal(self) -> bool:
        return self.objective == "clm"

    @property
    def local_half_window(self) -> int:
        return self.local_attention // 2

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None = None, path: str = "model") -> FlexBertConfig:
        """Build from a mapping; ``preset: NAME`` supplies defaults that the other keys override."""
        data = dict(data or {})
        preset = data.pop("preset", None)
        if preset is not None:
            if preset not in PRESETS:
                raise ConfigError(
                    child_path(path, "preset"), f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}"
                )
            merged = copy.deepcopy(PRESETS[preset])
            blocks = {**merged.pop("blocks", {}), **dict(data.pop("blocks", None) or {})}
            data = {**merged, **data, "blocks": blocks}
        return from_dict(cls, data, path)

    def validate(self, path: str = "model") -> None:
        """Raise :class:`ConfigError` naming the first field whose value cannot work."""

        def fail(key: str, message: str) -> None:
            raise ConfigError(child_path(path, key), message)

        for key in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "global_attn_every_n_layers",
            "loss_chunk_tokens",
        ):
            if getattr(self, key) <= 0:
                fail(key, f"must be positive, got {getattr(self, key)}")
        if self.hidden_size % self.num_attention_heads:
            fail(
                "hidden_size", f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2:
            fail(
                "num_attention_heads",
                f"head dim hidden_size/num_attention_heads = {self.head_dim} "
                "is odd; rotary embeddings need an even head dim",
            )
        if self.local_attention <= 0 or self.local_attention % 2:
            fail(
                "local_attention",
                f"must be a positive even window (query i sees |i-j| <= window/2), got {self.local_attention}",
            )
        for key in (
            "global_rope_theta",
            "local_rope_theta",
            "norm_eps",
            "initializer_range",
            "initializer_cutoff_factor",
        ):
            if not getattr(self, key) > 0:
                fail(key, f"must be > 0, got {getattr(self, key)}")
        for key in ("embedding_dropout", "attention_probs_dropout", "attention_output_dropout", "mlp_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                fail(key, f"must be in [0, 1), got {getattr(self, key)}")
        for key in ("pad_token_id", "cls_token_id", "sep_token_id"):
            token_id = getattr(self, key)
            if not 0 <= token_id < self.vocab_size:
                fail(key, f"{token_id} is outside the vocabulary [0, vocab_size={self.vocab_size})")
        self._validate_blocks(path)
        if self.attn_backend != "auto" and self.attn_backend not in CATALOGUE["attention_backend"]:
            fail(
                "attn_backend",
                f"unknown backend {self.attn_backend!r}; choose from "
                f"{', '.join(['auto', *CATALOGUE['attention_backend'].names()])}",
            )
        if self.attn_backend == "flash" and not flash_attn_available():
            fail(
                "attn_backend",
                "'flash' needs the flash-attn package (pip install 'flexbert[gpu]' "
                "on a CUDA machine); use 'auto', 'flex' or 'sdpa' instead",
            )
        if self.attn_backend == "flash3" and not flash3_available():
            fail(
                "attn_backend",
                "'flash3' needs FlashAttention-3 (the flash_attn_interface module, built from "
                "flash-attention's hopper/ folder on an H100 or H200); use 'auto', 'flash', 'flex' or 'sdpa' instead",
            )
        if self.attn_backend in ("flex", "flash3") and self.attention_probs_dropout > 0:
            kernel = {"flex": "FlexAttention", "flash3": "FlashAttention-3"}[self.attn_backend]
            fail(
                "attention_probs_dropout",
                f"{kernel} cannot drop attention probabilities; use attn_backend 'sdpa' or 'flash', or set it to 0",
            )

    def _validate_blocks(self, path: str) -> None:
        """Every chosen block is registered (plugins imported first, as they may register it), and
        its options are its own."""
        import_plugins(self.plugins, key_path=child_path(path, "plugins"))
        for slot in (slot_field.name for slot_field in dataclasses.fields(BlocksConfig)):
            registry = CATALOGUE[slot]  # each slot is filled from the registry of its name
            slot_path = child_path(child_path(path, "blocks"), slot)
            choice = getattr(self.blocks, slot)
            name, _ = split_choice(choice, slot_path)
            if name not in registry:
                raise ConfigError(
                    slot_path, f"unknown {registry.family} {name!r}; registered: {', '.join(registry.names())}"
                )
            registry.get(choice, slot_path)


PRESETS: dict[str, dict[str, Any]] = {
    "modernbert-base": dict(hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152),
    "modernbert-large": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, intermediate_size=2624),
}
