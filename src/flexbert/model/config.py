"""The FlexBERT model config: one typed dataclass, presets, and validation by key path."""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flexbert.model.activations import ACTIVATIONS
from flexbert.model.compile import REGIONS
from flexbert.typed_config import ConfigError, from_dict

ATTN_BACKENDS = ("auto", "flash", "flash3", "flex", "sdpa")


@dataclass
class BlocksConfig:
    """Which registered block fills each slot of the encoder (see ``flexbert registry``)."""

    embeddings: str = "token"
    attention: str = "rope"
    mlp: str = "glu"
    norm: str = "layernorm"
    layer: str = "prenorm"
    head: str = "mlm"
    init: str = "modernbert"
    loss: str = "cross_entropy"


@dataclass
class FlexBertConfig:
    """Hyper-parameters of a FlexBERT encoder. Defaults are ModernBERT-base."""

    vocab_size: int = 50368
    hidden_size: int = 768
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    intermediate_size: int = 1152
    max_position_embeddings: int = 8192
    hidden_activation: str = "gelu"
    head_activation: str = "gelu"
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
    # Layer i attends globally iff i % global_attn_every_n_layers == 0; the others see a window of
    # local_attention tokens: |i - j| <= local_attention // 2.
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
    attn_backend: str = "auto"
    # Submodules run through torch.compile: any of "mlp", "norm", "head" (see flexbert.model.compile).
    compile_regions: list[str] = field(default_factory=list)
    blocks: BlocksConfig = field(default_factory=BlocksConfig)
    # Modules imported before blocks are looked up, so user blocks can register themselves.
    plugins: list[str] = field(default_factory=list)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_global_layer(self, layer_idx: int) -> bool:
        return layer_idx % self.global_attn_every_n_layers == 0

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
                    f"{path}.preset", f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}"
                )
            merged = copy.deepcopy(PRESETS[preset])
            blocks = {**merged.pop("blocks", {}), **dict(data.pop("blocks", None) or {})}
            data = {**merged, **data, "blocks": blocks}
        config = from_dict(cls, data, path)
        config.validate(path)
        return config

    def validate(self, path: str = "model") -> None:
        """Raise :class:`ConfigError` naming the first field whose value cannot work."""

        def fail(key: str, message: str) -> None:
            raise ConfigError(f"{path}.{key}", message)

        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings", "global_attn_every_n_layers",
                    "loss_chunk_tokens"):
            if getattr(self, key) <= 0:
                fail(key, f"must be positive, got {getattr(self, key)}")
        if self.hidden_size % self.num_attention_heads:
            fail("hidden_size", f"{self.hidden_size} is not divisible by num_attention_heads="
                 f"{self.num_attention_heads}")
        if self.head_dim % 2:
            fail("num_attention_heads", f"head dim hidden_size/num_attention_heads = {self.head_dim} "
                 "is odd; rotary embeddings need an even head dim")
        if self.local_attention <= 0 or self.local_attention % 2:
            fail("local_attention", f"must be a positive even window (query i sees |i-j| <= window/2), "
                 f"got {self.local_attention}")
        for key in ("global_rope_theta", "local_rope_theta", "norm_eps", "initializer_range",
                    "initializer_cutoff_factor"):
            if not getattr(self, key) > 0:
                fail(key, f"must be > 0, got {getattr(self, key)}")
        for key in ("embedding_dropout", "attention_probs_dropout", "attention_output_dropout",
                    "mlp_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                fail(key, f"must be in [0, 1), got {getattr(self, key)}")
        for key in ("hidden_activation", "head_activation"):
            if getattr(self, key) not in ACTIVATIONS:
                fail(key, f"unknown activation {getattr(self, key)!r}; choose from {', '.join(ACTIVATIONS)}")
        for key in ("pad_token_id", "cls_token_id", "sep_token_id"):
            token_id = getattr(self, key)
            if not 0 <= token_id < self.vocab_size:
                fail(key, f"{token_id} is outside the vocabulary [0, vocab_size={self.vocab_size})")
        if self.attn_backend not in ATTN_BACKENDS:
            fail("attn_backend", f"unknown backend {self.attn_backend!r}; choose from {', '.join(ATTN_BACKENDS)}")
        if self.attn_backend == "flash" and importlib.util.find_spec("flash_attn") is None:
            fail("attn_backend", "'flash' needs the flash-attn package (pip install 'flexbert[gpu]' "
                 "on a CUDA machine); use 'auto', 'flex' or 'sdpa' instead")
        if self.attn_backend == "flash3" and importlib.util.find_spec("flash_attn_interface") is None:
            fail("attn_backend", "'flash3' needs FlashAttention-3 (the flash_attn_interface module, built from "
                 "flash-attention's hopper/ folder on an H100 or H200); use 'auto', 'flash', 'flex' or 'sdpa' instead")
        if self.attn_backend in ("flex", "flash3") and self.attention_probs_dropout > 0:
            kernel = {"flex": "FlexAttention", "flash3": "FlashAttention-3"}[self.attn_backend]
            fail("attention_probs_dropout", f"{kernel} cannot drop attention probabilities; "
                 "use attn_backend 'sdpa' or 'flash', or set it to 0")
        for region in self.compile_regions:
            if region not in REGIONS:
                fail("compile_regions", f"unknown region {region!r}; choose from {', '.join(REGIONS)}")
        self._validate_blocks(f"{path}.blocks")

    def _validate_blocks(self, path: str) -> None:
        from flexbert.model import registries
        from flexbert.registry import import_plugins

        import_plugins(self.plugins, key_path=path.rsplit(".", 1)[0] + ".plugins")
        for slot, registry in registries.BLOCK_REGISTRIES.items():
            name = getattr(self.blocks, slot)
            if name not in registry:
                raise ConfigError(
                    f"{path}.{slot}",
                    f"unknown {registry.family} {name!r}; registered: {', '.join(registry.names())}",
                )


PRESETS: dict[str, dict[str, Any]] = {
    "modernbert-base": dict(
        hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152,
    ),
    "modernbert-large": dict(
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, intermediate_size=2624,
    ),
}
