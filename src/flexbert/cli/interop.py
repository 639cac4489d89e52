"""The commands that move models between formats (``pip install flexbert``, no training stack):
``export-hf`` and ``import-hf`` (transformers' ModernBERT), ``export-st`` (sentence-transformers) and
``export-pylate`` (PyLate's ColBERT)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from flexbert.cli.arguments import add_pooling_argument
from flexbert.core.checkpoint import model_from_checkpoint
from flexbert.core.colbert import export_pylate, load_late_interaction
from flexbert.core.embedders import export_st, load_embedder, with_max_seq_len
from flexbert.core.hf import export_hf, export_notes, import_hf
from flexbert.errors import MissingFileError

try:  # a YAML recipe is read with OmegaConf (includes, interpolation), which the training extra installs
    from flexbert.yaml_config import load_yaml_config
except ImportError:
    load_yaml_config = None


def _training_config(path: str) -> dict[str, Any]:
    """The recipe a checkpoint was trained with: its run's resolved ``config.json``, or a YAML recipe."""
    if not Path(path).is_file():
        raise MissingFileError(f"--config {path}: no such file")
    if path.endswith(".json"):
        return json.loads(Path(path).read_text())
    if load_yaml_config is None:
        raise MissingFileError(
            f"--config {path}: reading a YAML recipe needs the training extra (pip install 'flexbert[train]'); "
            "the run folder's config.json needs nothing more"
        )
    return load_yaml_config(path)


def _cmd_export_hf(args: argparse.Namespace) -> int:
    training_config = _training_config(args.config) if args.config else None
    model, trained_tokenizer = model_from_checkpoint(args.checkpoint, training_config)
    tokenizer = args.tokenizer or trained_tokenizer
    out_dir = export_hf(model, args.out_dir, tokenizer, overwrite=args.overwrite)
    notes = export_notes(model.config)
    if tokenizer is None:
        notes.append(
            f"no tokenizer is known for {args.checkpoint}, so {out_dir} holds none; add one with --tokenizer DIR"
        )
    for note in notes:
        print(f"flexbert: note: {note}", file=sys.stderr)
    print(out_dir)
    return 0


def _configure_export_hf(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write a Composer checkpoint of this project as config.json, model.safetensors and "
        "tokenizer files that transformers' AutoModelForMaskedLM loads. The model config comes from "
        "--config, else from the checkpoint (import-hf stores it), else from the run folder's config.json."
    )
    parser.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="Composer checkpoint, e.g. runs/NAME/checkpoints/latest-rank0.pt"
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the Hugging Face directory to write")
    parser.add_argument(
        "--config",
        metavar="RECIPE",
        help="the recipe the checkpoint was trained with (a YAML file, or its run's config.json)",
    )
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer to ship (default: the training one)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    parser.set_defaults(run=_cmd_export_hf)


def _cmd_import_hf(args: argparse.Namespace) -> int:
    checkpoint = import_hf(args.hf_dir, args.out_checkpoint, overwrite=args.overwrite)
    print(f"{checkpoint} (train from it with load_path: {checkpoint} and load_weights_only: true)")
    return 0


def _configure_import_hf(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write the weights of a ModernBertForMaskedLM directory as a Composer-style checkpoint "
        "that a recipe loads with load_path and load_weights_only: true."
    )
    parser.add_argument("hf_dir", metavar="HF_DIR", help="a local ModernBERT directory (config.json, weights)")
    parser.add_argument(
        "out_checkpoint", metavar="OUT_CHECKPOINT", help="the checkpoint file to write, e.g. modernbert-base.pt"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_CHECKPOINT")
    parser.set_defaults(run=_cmd_import_hf)


def _cmd_export_st(args: argparse.Namespace) -> int:
    embedder = load_embedder(args.checkpoint, args.pooling)
    if args.max_seq_length is not None:
        embedder = with_max_seq_len(embedder, args.max_seq_length, "--max-seq-length")
    out_dir = export_st(
        embedder, args.out_dir, args.tokenizer, normalize=not args.no_normalize, overwrite=args.overwrite
    )
    for note in export_notes(embedder.config):
        print(f"flexbert: note: {note}", file=sys.stderr)
    print(out_dir)
    return 0


def _configure_export_st(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write an embedding model as a directory that sentence-transformers' "
        "SentenceTransformer(OUT_DIR) loads: the encoder as transformers' ModernBertModel, its tokenizer, "
        "and the Transformer -> Pooling -> Normalize modules. CHECKPOINT is an embedding fine-tune's "
        "checkpoint (e.g. RUN_DIR/checkpoints/best.pt), whose pooling and max_seq_len are kept; or any "
        "other checkpoint of this project or a Hugging Face ModernBertForMaskedLM directory, with --pooling."
    )
    parser.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="a checkpoint of this project, or a Hugging Face ModernBERT directory"
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the sentence-transformers directory to write")
    add_pooling_argument(parser)
    parser.add_argument(
        "--max-seq-length",
        type=int,
        metavar="N",
        help="cut inputs at N tokens (default: the fine-tune's max_seq_len, else the model's max_position_embeddings)",
    )
    parser.add_argument(
        "--no-normalize", action="store_true", help="leave out the Normalize module: vectors keep their length"
    )
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer to ship (default: the training one)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    parser.set_defaults(run=_cmd_export_st)


def _cmd_export_pylate(args: argparse.Namespace) -> int:
    print(export_pylate(load_late_interaction(args.checkpoint), args.out_dir, args.overwrite))
    return 0


def _configure_export_pylate(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write a late-interaction fine-tune's checkpoint (task.kind: late_interaction, e.g. "
        "RUN_DIR/checkpoints/best.pt) as a directory that PyLate's models.ColBERT(OUT_DIR) loads: the encoder "
        "as transformers' ModernBertModel, the tokenizer with its [Q] and [D] markers, the projection as "
        "1_Dense, and MaxSim with the query and document lengths and query expansion of training."
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a late-interaction fine-tune's checkpoint")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the PyLate directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    parser.set_defaults(run=_cmd_export_pylate)


PARSERS = {
    "export-hf": _configure_export_hf,
    "import-hf": _configure_import_hf,
    "export-st": _configure_export_st,
    "export-pylate": _configure_export_pylate,
}
