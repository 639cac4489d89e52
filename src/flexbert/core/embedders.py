"""Embedding models from checkpoints, and their export as sentence-transformers directories.

An embedding model is an encoder and a pooling, the rule that turns its token states into one vector
per document (``cls``: the first token's; ``mean``: the mean of all of them), normalised to unit
length. It comes from one of three sources:

* an embedding fine-tune's checkpoint (``task.kind: embedding``; ``RUN_DIR/checkpoints/best.pt`` or
  any checkpoint the run saved), which knows the pooling it was trained with;
* any other checkpoint of this project (pretraining, an import, an average, a classifier's
  fine-tune), or a Hugging Face ModernBertForMaskedLM directory: an encoder without a trained
  pooling, so the caller chooses one.

``flexbert export-st`` writes the sentence-transformers layout (its ``save()``):

    OUT_DIR/config.json, model.safetensors   the encoder as transformers' ModernBertModel
    OUT_DIR/tokenizer.json ...               the tokenizer
    OUT_DIR/modules.json                     Transformer -> Pooling (-> Normalize)
    OUT_DIR/sentence_bert_config.json        max_seq_length
    OUT_DIR/1_Pooling/config.json            the pooling
    OUT_DIR/2_Normalize/                     unit-length vectors (left out with --no-normalize)
    OUT_DIR/config_sentence_transformers.json   prompts and the similarity function (cosine)
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from flexbert.core.atomic_output import atomic_output_dir
from flexbert.core.checkpoint import RunDir, is_sharded, model_from_checkpoint, read_weights
from flexbert.core.embedding import Embedder
from flexbert.core.hf import export_hf, from_hf
from flexbert.core.model import FlexBertConfig, FlexBertForSentenceEmbedding
from flexbert.core.model.classification import Pooling
from flexbert.core.tasks import read_finetuned_run
from flexbert.core.tokenizer import MLMTokenizer, load_tokenizer
from flexbert.errors import CheckpointError, MissingFileError

POOLINGS = typing.get_args(Pooling)
ENCODER_PREFIX = "model."  # the encoder's weights inside every FlexBERT task model
# The layout written is the one sentence-transformers 5.3 saves, which the tests load; its version
# tells a reader which release wrote it, as its own save() does.
ST_LAYOUT_VERSION = "5.3.0"
ST_MODULES = "sentence_transformers.models"


@dataclass(frozen=True)
class _Encoder:
    """What a source gives: an encoder's weights (named ``model.*``, as in every task model) and what
    is known about how it was trained."""

    config: FlexBertConfig
    weights: dict[str, torch.Tensor]
    tokenizer_dir: Path | None
    max_seq_len: int
    trained_pooling: Pooling | None  # an embedding fine-tune's; None for any other encoder


def load_embedder(path: str | os.PathLike, pooling: Pooling | None = None) -> Embedder:
    """The embedding model at ``path``: a checkpoint of this project (a file, or a folder of FSDP
    shards) or a Hugging Face ModernBERT directory. ``pooling`` is required unless ``path`` is an
    embedding fine-tune's, and must then agree with the one it was trained with."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"model not found: {path} does not exist")
    if path.is_dir() and not is_sharded(path):
        encoder = _hf_encoder(path)
    else:
        run_config = RunDir.holding(path).read_config()
        if run_config is not None and "task" in run_config:
            encoder = _finetuned_encoder(path, run_config, RunDir.holding(path).config_file)
        else:
            encoder = _pretrained_encoder(path)
    chosen = _choose_pooling(path, encoder.trained_pooling, pooling)
    model = FlexBertForSentenceEmbedding(encoder.config, pooling=chosen)
    try:
        model.load_state_dict(encoder.weights, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1:2] or [str(err)]
        raise CheckpointError(f"{path} does not hold the encoder its config describes: {first[0].strip()}") from None
    dtype = next(iter(encoder.weights.values())).dtype
    return Embedder(path, model.to(dtype).eval(), encoder.tokenizer_dir, encoder.max_seq_len, chosen)


def with_max_seq_len(embedder: Embedder, max_seq_len: int, where: str) -> Embedder:
    """``embedder`` taking inputs of up to ``max_seq_len`` tokens; ``where`` names the setting."""
    positions = embedder.config.max_position_embeddings
    if not 2 <= max_seq_len <= positions:
        raise CheckpointError(
            f"{where}={max_seq_len}: must be between 2 ([CLS] and [SEP]) and the {positions} positions of "
            f"the model in {embedder.path}"
        )
    return dataclasses.replace(embedder, max_seq_len=max_seq_len)


def _choose_pooling(path: Path, trained: Pooling | None, requested: Pooling | None) -> Pooling:
    if requested is not None and requested not in POOLINGS:
        raise CheckpointError(f"pooling must be one of {', '.join(POOLINGS)}, got {requested!r}")
    if trained is None and requested is None:
        raise CheckpointError(
            f"{path} is an encoder without a trained pooling (not an embedding fine-tune's); choose one with "
            "--pooling cls|mean"
        )
    if trained is not None and requested not in (None, trained):
        raise CheckpointError(
            f"{path} was fine-tuned with {trained} pooling; --pooling {requested} would embed differently "
            "(leave it out)"
        )
    return trained or requested


def _encoder_weights(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor in weights.items() if name.startswith(ENCODER_PREFIX)}


def _hf_encoder(path: Path) -> _Encoder:
    model = from_hf(path)
    tokenizer_dir = path if (path / "tokenizer.json").is_file() else None
    config = model.config
    return _Encoder(config, _encoder_weights(model.state_dict()), tokenizer_dir, config.max_position_embeddings, None)


def _pretrained_encoder(path: Path) -> _Encoder:
    model, tokenizer_dir = model_from_checkpoint(path)
    config = model.config
    return _Encoder(config, _encoder_weights(model.state_dict()), tokenizer_dir, config.max_position_embeddings, None)


def _finetuned_encoder(path: Path, run_config: Mapping[str, Any], config_file: Path) -> _Encoder:
    """A fine-tune's encoder (see :func:`flexbert.core.tasks.read_finetuned_run`)."""
    run = read_finetuned_run(run_config, config_file)
    try:
        weights, _ = read_weights(path)
    except Exception as err:  # a truncated or foreign file fails in many ways inside torch.load
        raise CheckpointError(f"{path} is not a readable Composer checkpoint ({err})") from None
    trained_pooling = run.task.pooling if run.task.kind == "embedding" else None  # a classifier's pools for its head
    return _Encoder(run.model_config, _encoder_weights(weights), run.tokenizer.path, run.max_seq_len, trained_pooling)


# --- export to sentence-transformers ---------------------------------------------------------------


def _modules(normalize: bool) -> list[dict[str, Any]]:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": f"{ST_MODULES}.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": f"{ST_MODULES}.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": f"{ST_MODULES}.Normalize"})
    return modules


def _pooling_config(pooling: Pooling, hidden_size: int) -> dict[str, Any]:
    """Pooling's config under the keys sentence-transformers 2 to 6 read. Its ``mean`` averages
    every token its attention mask marks, [CLS] and [SEP] included, as ours does."""
    return {
        "word_embedding_dimension": hidden_size,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }


def _model_config() -> dict[str, Any]:
    return {
        "__version__": {
            "sentence_transformers": ST_LAYOUT_VERSION,
            "transformers": transformers.__version__,
            "pytorch": torch.__version__,
        },
        "model_type": "SentenceTransformer",
        # No text is put before queries or documents: the fine-tune saw them bare. These are the
        # empty prompts sentence-transformers 5 itself saves, which encode_query and encode_document use.
        "prompts": {"query": "", "document": ""},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",  # the similarity a contrastive fine-tune trains
    }


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


def write_transformer_module(
    model: torch.nn.Module, out: Path, tokenizer_dir: str | os.PathLike, max_seq_length: int
) -> None:
    """The Transformer module of a sentence-transformers directory (as PyLate's too) into ``out``:
    the encoder of a FlexBERT task model under transformers' ModernBertModel names, with its config,
    the tokenizer, and ``sentence_bert_config.json``."""
    state = model.state_dict()
    weights = {name.removeprefix(ENCODER_PREFIX): t for name, t in state.items() if name.startswith(ENCODER_PREFIX)}
    export_hf(model, out, tokenizer_dir, overwrite=True, weights=weights)
    config_json = json.loads((out / "config.json").read_text())
    write_json(out / "config.json", {**config_json, "architectures": ["ModernBertModel"]})
    write_json(out / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})


def fitting_tokenizer(config: FlexBertConfig, directory: str | os.PathLike) -> MLMTokenizer:
    """The tokenizer in ``directory``, refused in one line unless its ids fit the model: a vocabulary
    no larger than the model's, and the model's [CLS] and [SEP]."""
    tokenizer = load_tokenizer(directory)
    ours, theirs = (tokenizer.cls_id, tokenizer.sep_id), (config.cls_token_id, config.sep_token_id)
    if tokenizer.vocab_size > config.vocab_size or ours != theirs:
        raise CheckpointError(
            f"tokenizer {tokenizer.path} does not fit the model: {tokenizer.vocab_size} tokens for its "
            f"{config.vocab_size}, [CLS] and [SEP] ids {ours} for its {theirs}"
        )
    return tokenizer


def export_st(
    embedder: Embedder,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    normalize: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write ``embedder`` as a sentence-transformers directory that ``SentenceTransformer(out_dir)``
    loads, with inputs cut at ``embedder.max_seq_len`` tokens. The tokenizer is ``tokenizer_dir``,
    else the one the model was trained with. The directory appears all at once, or not at all."""
    tokenizer_dir = tokenizer_dir if tokenizer_dir is not None else embedder.tokenizer_dir
    if tokenizer_dir is None:
        raise CheckpointError(
            f"no tokenizer is known for {embedder.path}, and sentence-transformers needs one; add --tokenizer DIR"
        )
    with atomic_output_dir(out_dir, overwrite) as staging:
        write_transformer_module(embedder.model, staging, tokenizer_dir, embedder.max_seq_len)
        write_json(staging / "modules.json", _modules(normalize))
        write_json(
            staging / "1_Pooling" / "config.json", _pooling_config(embedder.pooling, embedder.config.hidden_size)
        )
        if normalize:
            (staging / "2_Normalize").mkdir()
        write_json(staging / "config_sentence_transformers.json", _model_config())
    return Path(out_dir)
