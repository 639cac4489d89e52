"""Interop with transformers' ModernBERT: config translation, export to a Hugging Face directory,
and import into a checkpoint that a training recipe's ``load_path`` accepts. A causal model
(``objective: clm``) exports as transformers' ``ModernBertDecoderForCausalLM`` (4.57 and later), the
class Ettin's decoders load as.

FlexBERT's default blocks use ModernBERT's parameter names, so weights move across unchanged: the
whole translation is in the config, and every way it can go wrong (a theta, an activation, a window
that transformers reads differently) shows up as different logits, which the tests check.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file
from transformers import ModernBertConfig, ModernBertForMaskedLM

try:  # transformers 4.57 and later; the core install also runs on 4.48, which can export no decoder
    from transformers import ModernBertDecoderConfig
except ImportError:
    ModernBertDecoderConfig = None

from flexbert.core.atomic_output import atomic_output_dir
from flexbert.core.checkpoint import (
    MODEL_CONFIG_KEY,
    TOKENIZER_DIR_KEY,
    checkpoint_model_config,
    read_checkpoint,
    write_weights,
)
from flexbert.core.model import (
    FlexBertConfig,
    FlexBertForMaskedLM,
    FlexBertForSequenceClassification,
    FlexBertForTokenClassification,
)
from flexbert.core.tokenizer import load_tokenizer
from flexbert.errors import InteropError, MissingFileError
from flexbert.registry import split_choice

# Blocks that transformers' ModernBERT implements; anything else cannot be represented there.
_MODERNBERT_BLOCKS = {
    "embeddings": "token",
    "attention": "rope",
    "mlp": "glu",
    "norm": "layernorm",
    "layer": "prenorm",
    "head": "mlm",
}
# The decoder shares the token embeddings; like save_pretrained, an export stores the matrix once.
_TIED_DECODER_KEY = "decoder.weight"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# --- configs --------------------------------------------------------------------------------------


# FlexBERT field -> transformers' ModernBertConfig field, for every field that means the same in both
# (the dropouts, the attention pattern and the special tokens beyond these are mapped by hand).
# 5.x keeps no global_attn_every_n_layers or thetas as fields: see _attention_pattern.
_SAME_FIELDS = {
    **{
        name: name
        for name in (
            "attention_bias",
            "cls_token_id",
            "decoder_bias",
            "embedding_dropout",
            "hidden_activation",
            "hidden_size",
            "initializer_cutoff_factor",
            "initializer_range",
            "intermediate_size",
            "local_attention",
            "max_position_embeddings",
            "mlp_bias",
            "mlp_dropout",
            "norm_bias",
            "norm_eps",
            "num_attention_heads",
            "num_hidden_layers",
            "pad_token_id",
            "sep_token_id",
            "sparse_prediction",
            "vocab_size",
        )
    },
    "head_activation": "classifier_activation",
    "head_bias": "classifier_bias",
}


def _hf_attention_pattern(hf_config: Any) -> dict[str, Any]:
    """The attention pattern of a ``ModernBertConfig`` under either vocabulary (see
    :func:`_attention_pattern`): ``layer_types`` and per-type ``rope_parameters`` where the config has
    them (transformers 5.x, which keeps no other), else 4.x's ``global_attn_every_n_layers`` and
    thetas."""
    layers = hf_config.num_hidden_layers
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        global_layers = [index for index, kind in enumerate(layer_types) if kind == "full_attention"]
        every = global_layers[1] - global_layers[0] if len(global_layers) > 1 else layers
        if list(layer_types) != ["full_attention" if i % every == 0 else "sliding_attention" for i in range(layers)]:
            raise InteropError(
                f"layer_types {list(layer_types)} is not one global layer every N starting with the first, "
                "the only pattern FlexBERT's global_attn_every_n_layers expresses"
            )
    else:
        every = hf_config.global_attn_every_n_layers
    rope = getattr(hf_config, "rope_parameters", None)
    if isinstance(rope, Mapping) and "full_attention" in rope:
        global_theta = rope["full_attention"]["rope_theta"]
        local_theta = (rope.get("sliding_attention") or {}).get("rope_theta", global_theta)
    else:
        global_theta, local_theta = hf_config.global_rope_theta, hf_config.local_rope_theta
    return {
        "global_attn_every_n_layers": every,
        "global_rope_theta": global_theta,
        "local_rope_theta": local_theta if local_theta is not None else global_theta,
    }


def flexbert_config_from_hf(hf_config: Any, attn_backend: str = "auto") -> FlexBertConfig:
    """Translate a ``transformers.ModernBertConfig`` (4.x or 5.x)."""
    return FlexBertConfig.from_dict(
        {
            **{ours: getattr(hf_config, theirs) for ours, theirs in _SAME_FIELDS.items()},
            **_hf_attention_pattern(hf_config),
            "attention_probs_dropout": hf_config.attention_dropout,
            "attention_output_dropout": hf_config.attention_dropout,
            "attn_backend": attn_backend,
        },
        path="hf_config",
    )


def _refuse_unrepresentable(config: FlexBertConfig) -> None:
    """Raise naming the first feature transformers' ModernBERT has no equivalent for: an export
    would load without error there and silently compute something else."""
    for slot, supported in _MODERNBERT_BLOCKS.items():
        chosen = split_choice(getattr(config.blocks, slot), f"model.blocks.{slot}")[0]
        if chosen != supported:
            raise InteropError(
                f"model.blocks.{slot}={chosen!r} has no equivalent in transformers' ModernBERT "
                f"(which uses {supported!r})"
            )
    if not config.final_norm:
        raise InteropError("model.final_norm=false has no equivalent in transformers' ModernBERT")


def export_notes(config: FlexBertConfig) -> list[str]:
    """What an export writes differently from the model's own config. Only training-time settings
    differ (dropout acts in training alone), or names that transformers reads another way, so the
    exported model computes what ours does."""
    notes = []
    if config.attention_output_dropout != config.attention_probs_dropout:
        notes.append(
            f"transformers' ModernBERT has one attention_dropout for probabilities and output, so config.json "
            f"has attention_dropout={config.attention_probs_dropout} (model.attention_probs_dropout) and "
            f"model.attention_output_dropout={config.attention_output_dropout} is left out; dropout acts only "
            "in training, so inference is unchanged"
        )
    if config.causal and _has_local_layers(config):
        notes.append(
            f"config.json has local_attention={_decoder_local_attention(config)}: transformers' decoder lets a "
            "token see local_attention // 2 tokens, itself included, so this is the value under which it sees "
            f"the same {config.local_half_window} earlier tokens as model.local_attention={config.local_attention}"
        )
    return notes


def _has_local_layers(config: FlexBertConfig) -> bool:
    return any(not config.is_global_layer(i) for i in range(config.num_hidden_layers))


def _decoder_local_attention(config: FlexBertConfig) -> int:
    """The ``local_attention`` of a ``ModernBertDecoderConfig`` whose local layers see what ours do.
    Our causal window is the encoder's, less the keys after the query: ``0 <= i - j <= window/2``.
    transformers' decoder uses ``sliding_window = local_attention // 2`` tokens counting the query,
    ``0 <= i - j < local_attention // 2``, so it needs a window two larger."""
    return config.local_attention + 2


def _refuse_undecodable(config: FlexBertConfig) -> None:
    """Raise naming the first feature transformers' ModernBertDecoderForCausalLM cannot express."""
    if ModernBertDecoderConfig is None:
        raise InteropError(
            "exporting a causal model (model.objective: clm) needs transformers 4.57 or later, whose "
            "ModernBertDecoderForCausalLM it loads as"
        )
    if config.global_rope_theta != config.local_rope_theta and _has_local_layers(config):
        raise InteropError(
            f"model.local_rope_theta={config.local_rope_theta} differs from model.global_rope_theta="
            f"{config.global_rope_theta}: transformers 4.x's ModernBertDecoder turns local layers by the "
            "global theta, so the export would compute something else there; train the decoder with equal thetas"
        )


def _attention_pattern(config: FlexBertConfig) -> dict[str, Any]:
    """Alternating attention under both vocabularies transformers has used. 4.x reads only the first
    three names and 5.x only the last two, so a config.json with one set silently gets the default
    pattern and thetas in the other version."""
    for key in ("global_rope_theta", "local_rope_theta"):
        theta = getattr(config, key)
        # A None or -1 theta loads without complaint and gives NaN logits (ModernBERT issue #209).
        if not (isinstance(theta, (int, float)) and math.isfinite(theta) and theta > 0):
            raise InteropError(f"model.{key}={theta!r} is not a positive RoPE theta")
    layer_types = [
        "full_attention" if config.is_global_layer(i) else "sliding_attention" for i in range(config.num_hidden_layers)
    ]
    return dict(
        global_attn_every_n_layers=config.global_attn_every_n_layers,
        global_rope_theta=float(config.global_rope_theta),
        local_rope_theta=float(config.local_rope_theta),
        layer_types=layer_types,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": float(config.global_rope_theta)},
            "sliding_attention": {"rope_type": "default", "rope_theta": float(config.local_rope_theta)},
        },
    )


def hf_config_from_flexbert(config: FlexBertConfig, **overrides: Any):
    """Translate to a ``transformers.ModernBertConfig``, or for a causal model a
    ``ModernBertDecoderConfig``; refuse what transformers cannot represent."""
    _refuse_unrepresentable(config)
    kwargs = {
        **{theirs: getattr(config, ours) for ours, theirs in _SAME_FIELDS.items()},
        "attention_dropout": config.attention_probs_dropout,  # see export_notes
        "bos_token_id": config.cls_token_id,
        "eos_token_id": config.sep_token_id,
        "tie_word_embeddings": True,
        **_attention_pattern(config),
        **overrides,
    }
    if config.causal:
        _refuse_undecodable(config)
        del kwargs["sparse_prediction"]  # an encoder's setting; the decoder predicts every token
        return ModernBertDecoderConfig(**{**kwargs, "local_attention": _decoder_local_attention(config)})
    return ModernBertConfig(**kwargs, reference_compile=False)


def _task(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """transformers' class for ``model`` and the config fields of its task head."""
    if model.config.causal:
        if type(model) is not FlexBertForMaskedLM:
            raise InteropError(
                f"a {type(model).__name__} on a causal model (model.objective: clm) has no ModernBERT "
                "class to export to; only the language model exports, as ModernBertDecoderForCausalLM"
            )
        return "ModernBertDecoderForCausalLM", {}
    if isinstance(model, FlexBertForSequenceClassification):
        problem = "regression" if model.num_labels == 1 else "single_label_classification"
        return "ModernBertForSequenceClassification", dict(
            num_labels=model.num_labels,
            classifier_pooling=model.pooling,
            classifier_dropout=model.classifier_dropout,
            problem_type=problem,
        )
    if isinstance(model, FlexBertForTokenClassification):
        return "ModernBertForTokenClassification", dict(
            num_labels=model.num_labels, classifier_dropout=model.classifier_dropout
        )
    return "ModernBertForMaskedLM", {}


def _config_json(model: nn.Module) -> dict[str, Any]:
    """The config.json of an export: every ModernBertConfig field, and the attention pattern under
    both versions' names whichever transformers is installed here."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    architecture, task_fields = _task(model)
    # 4.x's decoder config keeps only the sliding_window it derives from local_attention, and reads
    # local_attention back (default 128) when it loads: the window must be written as it is read.
    window = {"local_attention": _decoder_local_attention(model.config)} if model.config.causal else {}
    return {
        **hf_config_from_flexbert(model.config, **task_fields).to_dict(),
        **window,
        **_attention_pattern(model.config),
        "architectures": [architecture],
        "model_type": "modernbert-decoder" if model.config.causal else "modernbert",
        # transformers renamed torch_dtype to dtype in 4.56; each version reads one of them.
        "dtype": dtype,
        "torch_dtype": dtype,
    }


# --- export ---------------------------------------------------------------------------------------


def _tokenizer_files(tokenizer_dir: str | os.PathLike, config: FlexBertConfig) -> list[Path]:
    """The files to ship with the model, once the tokenizer is known to fit it."""
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.vocab_size > config.vocab_size:
        raise InteropError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, more than the "
            f"model's vocab_size={config.vocab_size}"
        )
    for key, token_id in (
        ("pad_token_id", tokenizer.pad_id),
        ("cls_token_id", tokenizer.cls_id),
        ("sep_token_id", tokenizer.sep_id),
    ):
        if getattr(config, key) != token_id:
            raise InteropError(
                f"model.{key}={getattr(config, key)} disagrees with tokenizer {tokenizer.path}, whose id is {token_id}"
            )
    return [tokenizer.path / name for name in TOKENIZER_FILES if (tokenizer.path / name).is_file()]


def export_hf(
    model: nn.Module,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (masked LM, sequence or token classifier) as the matching transformers
    ModernBERT directory: config.json, model.safetensors and, given ``tokenizer_dir``, the
    tokenizer files. ``weights`` replaces ``model.state_dict()`` where the model holds only a shard
    of them (FSDP); :func:`export_notes` says what the config maps.

    Everything is checked before anything is written, and the directory appears all at once.
    """
    config_json = _config_json(model)
    tokenizer_files = _tokenizer_files(tokenizer_dir, model.config) if tokenizer_dir is not None else []
    weights = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in (model.state_dict() if weights is None else weights).items()
        if name != _TIED_DECODER_KEY
    }
    if model.config.causal:
        weights = _decoder_weights(weights)
    with atomic_output_dir(out_dir, overwrite) as staging:
        (staging / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
        save_file(weights, staging / "model.safetensors", metadata={"format": "pt"})
        # safetensors creates the file 0600 whatever the umask; give it the directory's permissions.
        (staging / "model.safetensors").chmod(staging.stat().st_mode & 0o666)
        for file in tokenizer_files:
            shutil.copyfile(file, staging / file.name)
    return Path(out_dir)


def _decoder_weights(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names to ModernBertDecoderForCausalLM's: the fused ``Wqkv`` splits into ``q_proj``,
    ``k_proj`` and ``v_proj`` (its rows are [Q | K | V], each head by head, as theirs are), and the
    prediction head is ``lm_head``; every other name is the same."""
    renamed = {}
    for name, tensor in weights.items():
        if ".attn.Wqkv." in name:
            for part, rows in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                renamed[name.replace("Wqkv", part)] = rows.contiguous()
        elif name.startswith("head."):
            renamed["lm_" + name] = tensor
        else:
            renamed[name] = tensor
    return renamed


# --- import ---------------------------------------------------------------------------------------


def _check_modernbert_dir(path: Path) -> None:
    """Refuse, in one line, a path that is not a local directory of a ModernBERT model."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"{str(path)!r} is not a Hugging Face model directory (no config.json)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError):  # not JSON, or not a JSON object
        raise InteropError(f"{config_file} is not a Hugging Face config (a JSON object)") from None
    if model_type != "modernbert":
        raise InteropError(f"{path} holds a {model_type!r} model, not ModernBERT (model_type 'modernbert')")


def hf_dir_config(path: str | os.PathLike, attn_backend: str = "auto") -> FlexBertConfig:
    """The FlexBERT config of a local ModernBERT directory, read without loading its weights."""
    _check_modernbert_dir(Path(path))
    return flexbert_config_from_hf(ModernBertConfig.from_pretrained(path), attn_backend)


def _load_hf_dir(path: Path):
    """A ModernBertForMaskedLM from a local directory, refusing anything that would load with
    freshly initialised weights in place of missing ones."""
    _check_modernbert_dir(path)
    try:
        hf_model, info = ModernBertForMaskedLM.from_pretrained(path, output_loading_info=True)
    except OSError as err:  # no weights file, or an unreadable one
        raise InteropError(f"{path}: {err}") from None
    if info["missing_keys"]:
        raise InteropError(
            f"{path} is not a ModernBertForMaskedLM checkpoint; it lacks " + ", ".join(sorted(info["missing_keys"]))
        )
    return hf_model


def from_hf(model_or_dir: Any, attn_backend: str = "auto") -> FlexBertForMaskedLM:
    """A ``ModernBertForMaskedLM`` (instance or local directory) as a :class:`FlexBertForMaskedLM`
    with the same weights."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        hf_model = _load_hf_dir(Path(model_or_dir))
    else:
        hf_model = model_or_dir
    if not isinstance(hf_model, ModernBertForMaskedLM):
        raise TypeError(f"expected a ModernBertForMaskedLM, got {type(hf_model).__name__}")
    model = FlexBertForMaskedLM(flexbert_config_from_hf(hf_model.config, attn_backend))
    # FlexBERT's default blocks carry ModernBERT's parameter names, so the keys match one to one.
    model.load_state_dict(hf_model.state_dict(), strict=True)
    return model.to(next(hf_model.parameters()).dtype)


def import_hf(hf_dir: str | os.PathLike, out_checkpoint: str | os.PathLike, overwrite: bool = False) -> Path:
    """Turn a ModernBERT directory into a checkpoint file that a recipe loads with ``load_path`` and
    ``load_weights_only: true``; its model config rides along so that :func:`export_hf` can
    re-export it."""
    out = Path(out_checkpoint)
    if out.is_dir():
        raise InteropError(f"output {out} is a directory; name the checkpoint file to write")
    if out.exists() and not overwrite:
        raise InteropError(f"output {out} already exists; use --overwrite to replace it")
    model = from_hf(hf_dir)
    extras = {MODEL_CONFIG_KEY: dataclasses.asdict(model.config)}
    if (Path(hf_dir) / "tokenizer.json").is_file():
        extras[TOKENIZER_DIR_KEY] = str(Path(hf_dir).resolve())
    write_weights(out, model.state_dict(), **extras)
    return out


# --- a published encoder to start a run from ------------------------------------------------------

# What ``save_pretrained`` writes the weights as: one file, an index of shards, or the older pickle.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class PublishedEncoder:
    """A trained masked-LM encoder that a run continues: a transformers ModernBERT directory (such as
    ModernBERT's or Ettin's releases), or a checkpoint file that ``flexbert import-hf`` wrote."""

    path: Path
    config: FlexBertConfig  # its architecture, special-token ids included
    tokenizer_dir: Path | None  # its tokenizer, where known

    def weights(self) -> dict[str, torch.Tensor]:
        """Its weights under FlexBERT's names (the decoder tied to the token embeddings)."""
        if self.path.is_dir():
            return from_hf(self.path).state_dict()
        return read_checkpoint(self.path)[0]


def read_published_encoder(path: str | os.PathLike) -> PublishedEncoder:
    """Everything but the weights of the encoder at ``path``, checked enough that reading the weights
    later cannot fail on what the path is: one line for a path that is not a ModernBERT masked LM."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path} does not exist")
    if path.is_file():
        config, tokenizer_dir = checkpoint_model_config(path, read_checkpoint(path)[1])
        return PublishedEncoder(path, config, tokenizer_dir)
    _check_modernbert_dir(path)
    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    if architectures and "ModernBertForMaskedLM" not in architectures:
        raise InteropError(
            f"{path} holds a {', '.join(architectures)}, not a ModernBertForMaskedLM: continued "
            "pretraining needs the masked-LM head"
        )
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise MissingFileError(f"{path} has no weights ({' or '.join(_WEIGHT_FILES)})")
    tokenizer_dir = path if (path / "tokenizer.json").is_file() else None
    return PublishedEncoder(path, hf_dir_config(path), tokenizer_dir)
