"""Interop with transformers' ModernBERT: config translation and weight import.

FlexBERT's default blocks use ModernBERT's parameter names, so weights move across unchanged.
"""

from __future__ import annotations

import os
from typing import Any

from flexbert.model import FlexBertConfig, FlexBertForMaskedLM

# Blocks that transformers' ModernBERT implements; anything else cannot be represented there.
_MODERNBERT_BLOCKS = {
    "embeddings": "token", "attention": "rope", "mlp": "glu", "norm": "layernorm",
    "layer": "prenorm", "head": "mlm",
}


def flexbert_config_from_hf(hf_config: Any, attn_backend: str = "auto") -> FlexBertConfig:
    """Translate a ``transformers.ModernBertConfig``."""
    local_theta = hf_config.local_rope_theta
    return FlexBertConfig.from_dict(
        dict(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=hf_config.num_attention_heads,
            intermediate_size=hf_config.intermediate_size,
            max_position_embeddings=hf_config.max_position_embeddings,
            hidden_activation=hf_config.hidden_activation,
            head_activation=hf_config.classifier_activation,
            norm_eps=float(hf_config.norm_eps),
            norm_bias=hf_config.norm_bias,
            attention_bias=hf_config.attention_bias,
            mlp_bias=hf_config.mlp_bias,
            head_bias=hf_config.classifier_bias,
            decoder_bias=hf_config.decoder_bias,
            embedding_dropout=float(hf_config.embedding_dropout),
            attention_probs_dropout=float(hf_config.attention_dropout),
            attention_output_dropout=float(hf_config.attention_dropout),
            mlp_dropout=float(hf_config.mlp_dropout),
            global_attn_every_n_layers=hf_config.global_attn_every_n_layers,
            local_attention=hf_config.local_attention,
            global_rope_theta=float(hf_config.global_rope_theta),
            local_rope_theta=float(local_theta if local_theta is not None else hf_config.global_rope_theta),
            initializer_range=hf_config.initializer_range,
            initializer_cutoff_factor=hf_config.initializer_cutoff_factor,
            pad_token_id=hf_config.pad_token_id,
            cls_token_id=hf_config.cls_token_id,
            sep_token_id=hf_config.sep_token_id,
            sparse_prediction=hf_config.sparse_prediction,
            attn_backend=attn_backend,
        ),
        path="hf_config",
    )


def hf_config_from_flexbert(config: FlexBertConfig, **overrides: Any):
    """Translate to a ``transformers.ModernBertConfig``; refuse what ModernBERT cannot represent."""
    from transformers import ModernBertConfig

    for slot, supported in _MODERNBERT_BLOCKS.items():
        chosen = getattr(config.blocks, slot)
        if chosen != supported:
            raise ValueError(
                f"model.blocks.{slot}={chosen!r} has no equivalent in transformers' ModernBERT "
                f"(which uses {supported!r})"
            )
    if not config.final_norm:
        raise ValueError("model.final_norm=false has no equivalent in transformers' ModernBERT")
    if config.attention_probs_dropout != config.attention_output_dropout:
        raise ValueError(
            "transformers' ModernBERT has one attention_dropout for probabilities and output; "
            f"model.attention_probs_dropout={config.attention_probs_dropout} differs from "
            f"model.attention_output_dropout={config.attention_output_dropout}"
        )
    kwargs = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        hidden_activation=config.hidden_activation,
        classifier_activation=config.head_activation,
        norm_eps=config.norm_eps,
        norm_bias=config.norm_bias,
        attention_bias=config.attention_bias,
        mlp_bias=config.mlp_bias,
        classifier_bias=config.head_bias,
        decoder_bias=config.decoder_bias,
        embedding_dropout=config.embedding_dropout,
        attention_dropout=config.attention_output_dropout,
        mlp_dropout=config.mlp_dropout,
        global_attn_every_n_layers=config.global_attn_every_n_layers,
        local_attention=config.local_attention,
        global_rope_theta=config.global_rope_theta,
        local_rope_theta=config.local_rope_theta,
        initializer_range=config.initializer_range,
        initializer_cutoff_factor=config.initializer_cutoff_factor,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.cls_token_id,
        eos_token_id=config.sep_token_id,
        cls_token_id=config.cls_token_id,
        sep_token_id=config.sep_token_id,
        sparse_prediction=config.sparse_prediction,
        tie_word_embeddings=True,
        reference_compile=False,
    )
    kwargs.update(overrides)
    return ModernBertConfig(**kwargs)


def from_hf(model_or_dir: Any, attn_backend: str = "auto") -> FlexBertForMaskedLM:
    """A ``ModernBertForMaskedLM`` (instance or local directory) as a :class:`FlexBertForMaskedLM`
    with the same weights."""
    from transformers import AutoModelForMaskedLM, ModernBertForMaskedLM

    if isinstance(model_or_dir, (str, os.PathLike)):
        path = os.fspath(model_or_dir)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path!r} is not a Hugging Face model directory (no config.json)")
        hf_model = AutoModelForMaskedLM.from_pretrained(path)
    else:
        hf_model = model_or_dir
    if not isinstance(hf_model, ModernBertForMaskedLM):
        raise TypeError(f"expected a ModernBertForMaskedLM, got {type(hf_model).__name__}")
    model = FlexBertForMaskedLM(flexbert_config_from_hf(hf_model.config, attn_backend))
    # FlexBERT's default blocks carry ModernBERT's parameter names, so the keys match one to one.
    model.load_state_dict(hf_model.state_dict(), strict=True)
    return model.to(next(hf_model.parameters()).dtype)
