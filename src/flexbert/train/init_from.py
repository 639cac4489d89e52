"""``init_from:`` where a new run's weights come from, when not from a fresh initialisation:

* ``hf: SOURCE``: continue a published encoder (a transformers ModernBERT masked-LM directory, such as
  ModernBERT's or Ettin's releases, or a checkpoint ``flexbert import-hf`` wrote). The source gives
  the architecture, the weights and the tokenizer; the recipe's ``model:`` section may only set what
  acts in training alone (:data:`TRAINING_ONLY_KEYS`), and any other key it gives must restate the
  source's value. A tokenizer that extends the source's (``flexbert prepare tokenizer --extend``)
  grows the vocabulary: each new token's rows start as the mean of its pieces' rows.
* ``checkpoint: FILE`` (``method: tile``): a smaller model of this project tiled into the recipe's
  larger shapes, as ModernBERT-large started from base (:mod:`flexbert.core.model.tiling`). FILE may
  be an ``s3://`` URI (:mod:`flexbert.core.object_storage`), downloaded by every rank when it starts.

Either way the run starts afresh (new optimizer, clock at zero), as ``load_path`` with
``load_weights_only`` does for a phase of the same model.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from flexbert.core.checkpoint import model_config_for, model_from_checkpoint
from flexbert.core.hf import PublishedEncoder, read_published_encoder
from flexbert.core.model import FlexBertConfig, FlexBertForMaskedLM
from flexbert.core.model.config import PRESETS
from flexbert.core.model.tiling import tile_into
from flexbert.core.object_storage import find_remote_checkpoint, is_remote
from flexbert.core.tokenizer import MLMTokenizer, load_tokenizer
from flexbert.core.vocabulary import extend_vocabulary_rows, vocabulary_relation
from flexbert.errors import FlexBertError
from flexbert.typed_config import ConfigError

# Model keys a continued run may set whatever the source says: they change how training computes,
# not what the weights mean (dropouts act in training alone; the kernel, compilation and the loss's
# chunking give the same function). And the objective: the same weights continue as an encoder or a
# decoder, as Ettin continues each of its models with the other objective.
TRAINING_ONLY_KEYS = frozenset(
    {
        "embedding_dropout",
        "attention_probs_dropout",
        "attention_output_dropout",
        "mlp_dropout",
        "attn_backend",
        "compile_regions",
        "loss_chunk_tokens",
        "sparse_prediction",
        "plugins",
        "objective",
    }
)
# The per-token rows of a masked LM's weights, which a larger vocabulary extends (the decoder's
# weight is tied to the embeddings and follows them).
_EMBEDDINGS_KEY = "model.embeddings.tok_embeddings.weight"
_TIED_DECODER_KEY = "decoder.weight"
_DECODER_BIAS_KEY = "decoder.bias"


@dataclass
class InitFromConfig:
    """The ``init_from:`` section: one of ``hf`` or ``checkpoint``."""

    hf: str | None = None  # a published encoder to continue: architecture, weights and tokenizer
    checkpoint: str | None = None  # a smaller model of this project, tiled into the recipe's shapes
    method: Literal["tile"] | None = None  # how ``checkpoint`` maps into the model (tile, the default)
    # Resolved at validation, absent from recipes.
    source: PublishedEncoder | None = field(default=None, init=False, repr=False)

    def validate(self, path: str) -> None:
        given = [key for key in ("hf", "checkpoint") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ConfigError(
                path,
                "give one of hf (a published encoder to continue) or checkpoint (a smaller model to tile), "
                + ("not both" if given else "got neither"),
            )
        if self.hf is not None:
            if self.method is not None:
                raise ConfigError(f"{path}.method", "applies to checkpoint; hf continues the source's own architecture")
            try:
                self.source = read_published_encoder(self.hf)
            except FlexBertError as err:
                raise ConfigError(f"{path}.hf", str(err)) from None
        elif is_remote(self.checkpoint):  # an s3:// URI: found now, downloaded when the weights are set
            try:
                find_remote_checkpoint(self.checkpoint)
            except FlexBertError as err:
                raise ConfigError(f"{path}.checkpoint", str(err)) from None
        elif not os.path.exists(self.checkpoint):
            raise ConfigError(f"{path}.checkpoint", f"checkpoint not found: {self.checkpoint}")


def _given_model_keys(model: Mapping[str, Any]) -> dict[str, Any]:
    """The model keys a recipe states, its preset expanded (a preset's keys are statements too)."""
    given = dict(model)
    preset = given.pop("preset", None)
    if preset is None:
        return given
    if preset not in PRESETS:
        raise ConfigError("model.preset", f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    return {**PRESETS[preset], **given}


def continued_model_section(model: Mapping[str, Any], source: PublishedEncoder, vocab_size: int) -> dict[str, Any]:
    """The model section of a run continuing ``source``: the source's architecture (with the
    vocabulary grown to ``vocab_size``), and the recipe's training-only keys. Any other key the
    recipe gives must equal the source's, or the one line names it and both values."""
    source_fields = {**dataclasses.asdict(source.config), "vocab_size": vocab_size, "attn_backend": "auto"}
    section = dict(source_fields)
    for key, value in _given_model_keys(model).items():
        if key in TRAINING_ONLY_KEYS or key not in source_fields:  # unknown keys: from_dict names them
            section[key] = value
            continue
        theirs = source_fields[key]
        if key == "blocks" and isinstance(value, Mapping):
            for slot, choice in value.items():
                if slot in theirs and choice != theirs[slot]:
                    _disagree(f"model.blocks.{slot}", choice, theirs[slot], source)
            section[key] = {**theirs, **value}
        elif value != theirs:
            _disagree(f"model.{key}", value, theirs, source)
    return section


def _disagree(key_path: str, ours: Any, theirs: Any, source: PublishedEncoder) -> None:
    raise ConfigError(
        key_path,
        f"{ours!r} disagrees with the source's {theirs!r} (init_from.hf: {source.path}); a continued run "
        "keeps the source's architecture, so drop the key or restate the source's value",
    )


@dataclass(frozen=True)
class ContinuedModel:
    """What a run continuing a published encoder builds, resolved from the recipe and the source."""

    config: FlexBertConfig
    section: dict[str, Any]  # the model section as the run folder records it
    tokenizer: MLMTokenizer
    extends_vocabulary: bool  # the tokenizer adds tokens to the source's


def resolve_continued_model(
    model: Mapping[str, Any], source: PublishedEncoder, tokenizer_dir: str | None, key_path: str = "train_loader"
) -> ContinuedModel:
    """The model and tokenizer of a run that continues ``source``. ``tokenizer_dir`` is the recipe's
    (None: the source's own). A tokenizer must be the source's, or extend it; its special tokens
    must carry the source's ids."""
    tokenizer_key = f"{key_path}.tokenizer"
    if tokenizer_dir is None:
        if source.tokenizer_dir is None:
            raise ConfigError(
                tokenizer_key,
                f"the source {source.path} carries no tokenizer (no tokenizer.json, or the directory it "
                "was imported from is gone); name the tokenizer directory here",
            )
        tokenizer_dir = str(source.tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    extends = False
    if source.tokenizer_dir is not None and source.tokenizer_dir.resolve() != tokenizer.path.resolve():
        try:
            relation = vocabulary_relation(source.tokenizer_dir, tokenizer.path)
        except FlexBertError as err:
            raise ConfigError(tokenizer_key, str(err)) from None
        extends = relation == "extended"
    if tokenizer.vocab_size > source.config.vocab_size and not extends:
        raise ConfigError(
            tokenizer_key,
            f"{tokenizer.path} has {tokenizer.vocab_size} tokens, more than the source's vocab_size="
            f"{source.config.vocab_size}; only an extension of the source's own tokenizer can grow it",
        )
    vocab_size = max(source.config.vocab_size, tokenizer.vocab_size)
    section = continued_model_section(model, source, vocab_size)
    for key, name in (("pad_token_id", "pad"), ("cls_token_id", "cls"), ("sep_token_id", "sep")):
        token_id = getattr(tokenizer, f"{name}_id")
        if token_id != section[key]:
            raise ConfigError(
                tokenizer_key,
                f"{tokenizer.path} gives its {name} token id {token_id}, but the source's {key} is {section[key]}",
            )
    return ContinuedModel(model_config_for(section, tokenizer), section, tokenizer, extends)


def initialise_weights(model: FlexBertForMaskedLM, init_from: InitFromConfig, tokenizer: MLMTokenizer) -> None:
    """Put the weights ``init_from`` names into the freshly built ``model`` (before any wrapping)."""
    if init_from.checkpoint is not None:
        small = model_from_checkpoint(init_from.checkpoint)[0]
        tile_into(model, small.state_dict(), small.config)
        return
    source = init_from.source
    weights = source.weights()
    vocab_size = model.config.vocab_size
    if weights[_EMBEDDINGS_KEY].shape[0] < vocab_size:
        for key in (_EMBEDDINGS_KEY, _DECODER_BIAS_KEY):
            if key in weights:
                weights[key] = extend_vocabulary_rows(weights[key], source.tokenizer_dir, tokenizer.path, vocab_size)
        weights[_TIED_DECODER_KEY] = weights[_EMBEDDINGS_KEY]
    try:
        with torch.no_grad():
            model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1:2] or [str(err)]
        raise ConfigError("init_from.hf", f"{source.path} does not fit the model: {first[0].strip()}") from None
