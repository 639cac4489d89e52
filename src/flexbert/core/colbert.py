"""Late-interaction (ColBERT) models from checkpoints: their retrieval scorer, and their export as
PyLate directories.

A late-interaction model is what a ``task.kind: late_interaction`` fine-tune trains
(:class:`flexbert.core.model.late_interaction.FlexBertForLateInteraction`): its checkpoint, e.g.
``RUN_DIR/checkpoints/best.pt``, and the run folder's ``config.json`` that says how queries and
documents are laid out. ``flexbert export-pylate`` writes PyLate's layout:

    OUT_DIR/config.json, model.safetensors   the encoder as transformers' ModernBertModel
    OUT_DIR/tokenizer.json ...               the tokenizer, with "[Q] " and "[D] " at the markers' ids
    OUT_DIR/modules.json                     Transformer -> pylate Dense
    OUT_DIR/1_Dense/config.json, model.safetensors   the projection to ``dim``, without bias
    OUT_DIR/sentence_bert_config.json        max_seq_length (the document length)
    OUT_DIR/config_sentence_transformers.json   MaxSim, the prefixes, lengths and query expansion

PyLate then lays texts out as training did: the marker after [CLS], queries padded to
``query_length`` with [MASK] that the encoder attends to (``attend_to_expansion_tokens``), and no
document token skipped (``skiplist_words`` empty), so its scores are ours.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

from flexbert.core.atomic_output import atomic_output_dir
from flexbert.core.checkpoint import RunDir, read_weights
from flexbert.core.embedders import ST_LAYOUT_VERSION, write_json, write_transformer_module
from flexbert.core.model.late_interaction import FlexBertForLateInteraction, document_tokens, maxsim, query_tokens
from flexbert.core.retrieval import Role
from flexbert.core.tasks import TaskConfig, marker_ids, read_finetuned_run, with_marker_ids
from flexbert.core.tokenizer import MLMTokenizer
from flexbert.errors import CheckpointError, MissingFileError
from tokenizers import AddedToken, Tokenizer

QUERY_PREFIX, DOCUMENT_PREFIX = "[Q] ", "[D] "  # PyLate's marker tokens, which it adds to a tokenizer
ENCODE_BATCH = 64  # texts per forward pass when encoding for retrieval


@dataclass(frozen=True)
class LateInteractionModel:
    path: Path  # where it was loaded from
    model: FlexBertForLateInteraction  # in eval mode, on the CPU
    tokenizer: MLMTokenizer  # the one it was trained with (without the markers, whose ids follow its last)
    task: TaskConfig  # dim, query_length, document_length


def late_interaction_run_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The resolved recipe of the late-interaction fine-tune that saved ``path``, or None when
    ``path`` is not one's checkpoint."""
    config = RunDir.holding(Path(path)).read_config() if Path(path).is_file() else None
    if config is None or not isinstance(config.get("task"), Mapping):
        return None
    return config if config["task"].get("kind") == "late_interaction" else None


def load_late_interaction(path: str | os.PathLike) -> LateInteractionModel:
    """The late-interaction model a fine-tune's checkpoint holds. Only the recipe's model, tokenizer
    and task are read: its training data is often gone."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"model not found: {path} does not exist")
    run_config = late_interaction_run_config(path)
    config_file = RunDir.holding(path).config_file
    if run_config is None:
        raise CheckpointError(
            f"{path} is not a late-interaction fine-tune's checkpoint (its run folder's {config_file.name} "
            "has no task.kind: late_interaction)"
        )
    run = read_finetuned_run(run_config, config_file)
    task, tokenizer = run.task, run.tokenizer
    model = FlexBertForLateInteraction(with_marker_ids(run.model_config, tokenizer), task.dim, task.temperature)
    try:
        weights, _ = read_weights(path)
        model.load_state_dict(weights, strict=True)
    except Exception as err:  # a truncated, foreign or mismatched file fails in many ways
        first = str(err).splitlines()[1:2] or [str(err)]
        raise CheckpointError(f"{path} does not hold the model {config_file} describes: {first[0].strip()}") from None
    return LateInteractionModel(path, model.eval(), tokenizer, task)


# --- retrieval ---------------------------------------------------------------------------------------


@dataclass
class LateInteractionScorer:
    """Token vectors per text, with the markers and query expansion of training, compared by MaxSim
    (a :class:`flexbert.core.retrieval.Scorer`)."""

    late: LateInteractionModel
    device: torch.device

    def encode(self, texts: Sequence[str], role: Role) -> tuple[torch.Tensor, torch.Tensor]:
        """([texts, width, dim] vectors, [texts, width] mask), width the role's length."""
        task, tokenizer = self.late.task, self.late.tokenizer
        query_marker, document_marker = marker_ids(tokenizer)
        width = task.query_length if role == "query" else task.document_length
        framed = []
        for encoding in tokenizer.tokenizer.encode_batch(list(texts), add_special_tokens=True):
            ids = np.asarray(encoding.ids, dtype=np.int64)
            if role == "query":
                framed.append(query_tokens(ids, query_marker, tokenizer.mask_id, width))
            else:
                framed.append(document_tokens(ids, document_marker, width))
        vectors = torch.zeros(len(framed), width, task.dim, device=self.device)
        mask = torch.zeros(len(framed), width, dtype=torch.bool, device=self.device)
        with torch.inference_mode():
            for start in range(0, len(framed), ENCODE_BATCH):
                batch = framed[start : start + ENCODE_BATCH]
                lengths = torch.tensor([0] + [len(ids) for ids in batch])
                input_ids = torch.from_numpy(np.concatenate(batch)).to(self.device)
                cu_seqlens = lengths.cumsum(0).to(self.device, torch.int32)
                grid, real = self.late.model.embed(input_ids, cu_seqlens, int(lengths.max()))
                vectors[start : start + len(batch), : grid.shape[1]] = grid.float()
                mask[start : start + len(batch), : real.shape[1]] = real
        return vectors, mask

    def scores(self, queries: tuple[torch.Tensor, torch.Tensor], documents: tuple[torch.Tensor, torch.Tensor]):
        query_vectors, query_mask = queries
        # MaxSim holds a similarity per query-token and document-token pair: documents go in slices.
        return torch.cat(
            [
                maxsim(query_vectors, query_mask, vectors, mask)
                for vectors, mask in zip(*(d.split(256) for d in documents))
            ],
            dim=1,
        )


def late_interaction_scorer(path: str | os.PathLike) -> LateInteractionScorer:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    late = load_late_interaction(path)
    late.model.to(device=device, dtype=torch.float32)
    return LateInteractionScorer(late, device)


# --- export to PyLate ----------------------------------------------------------------------------------


def _tokenizer_with_markers(tokenizer: MLMTokenizer, out: Path) -> Path:
    """A copy of ``tokenizer``'s folder whose tokenizer.json holds the markers at their ids, as the
    plain added tokens PyLate would add, so that PyLate finds them there instead of adding them."""
    shutil.copytree(tokenizer.path, out)
    with_markers = Tokenizer.from_file(str(tokenizer.path / "tokenizer.json"))
    with_markers.add_tokens([AddedToken(QUERY_PREFIX, normalized=True), AddedToken(DOCUMENT_PREFIX, normalized=True)])
    ids = (with_markers.token_to_id(QUERY_PREFIX), with_markers.token_to_id(DOCUMENT_PREFIX))
    if ids != marker_ids(tokenizer):  # the tokenizer already had one of them, somewhere else
        raise CheckpointError(f"tokenizer {tokenizer.path} gives the markers ids {ids}, not {marker_ids(tokenizer)}")
    with_markers.save(str(out / "tokenizer.json"))
    return out


def _pylate_config(task: TaskConfig) -> dict[str, Any]:
    return {
        "__version__": {
            "sentence_transformers": ST_LAYOUT_VERSION,
            "transformers": transformers.__version__,
            "pytorch": torch.__version__,
        },
        "model_type": "ColBERT",  # PyLate reads these keys only from a ColBERT's config
        "prompts": {"query": "", "document": ""},
        "default_prompt_name": None,
        "similarity_fn_name": "MaxSim",
        "query_prefix": QUERY_PREFIX,
        "document_prefix": DOCUMENT_PREFIX,
        "query_length": task.query_length,
        "document_length": task.document_length,
        "do_query_expansion": True,
        "attend_to_expansion_tokens": True,  # training attends to them: the encoder sees whole sequences
        "skiplist_words": [],  # training scores every document token
    }


def export_pylate(late: LateInteractionModel, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``late`` as a directory that ``pylate.models.ColBERT(out_dir)`` loads, appearing all at
    once or not at all."""
    projection = late.model.state_dict()["projection.weight"]
    with tempfile.TemporaryDirectory() as scratch, atomic_output_dir(out_dir, overwrite) as staging:
        tokenizer_dir = _tokenizer_with_markers(late.tokenizer, Path(scratch) / "tokenizer")
        write_transformer_module(late.model, staging, tokenizer_dir, late.task.document_length)
        write_json(
            staging / "modules.json",
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Dense", "type": "pylate.models.Dense.Dense"},
            ],
        )
        write_json(
            staging / "1_Dense" / "config.json",
            {
                "in_features": projection.shape[1],
                "out_features": projection.shape[0],
                "bias": False,
                "activation_function": "torch.nn.modules.linear.Identity",
                "use_residual": False,
            },
        )
        save_file({"linear.weight": projection.detach().cpu().contiguous()}, staging / "1_Dense" / "model.safetensors")
        write_json(staging / "config_sentence_transformers.json", _pylate_config(late.task))
    return Path(out_dir)
