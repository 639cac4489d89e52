"""The ``flexbert`` command line: one table of commands, each loaded only when it runs.

``flexbert --help`` lists the table without importing any command, so it stays fast. A command's
module (``flexbert.cli.<module>``) defines ``PARSERS``: for each of its commands, a function that
adds the command's arguments to its parser and sets ``run``. The model-side commands run on the core
install (``pip install flexbert``); the others need the training extra, and say so in one line when
it is missing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from flexbert.errors import FlexBertError

TRAIN_EXTRA = "pip install 'flexbert[train]'"
TRAINING_PACKAGES = ("composer", "streaming", "omegaconf", "wandb")  # what the training extra brings


@dataclass(frozen=True)
class Command:
    module: str  # under flexbert.cli
    summary: str  # its line in ``flexbert --help``
    needs_train: bool  # whether it needs the training extra (Composer, streaming, OmegaConf, wandb)


COMMANDS: dict[str, Command] = {
    # Training and data preparation: pip install 'flexbert[train]'
    "train": Command("training", "train from a YAML recipe (what main.py runs)", True),
    "sweep": Command("sweeps", "train a recipe over a grid and/or random search of its config keys", True),
    "glue": Command("sweeps", "fine-tune a model on GLUE as ModernBERT's paper did, and write its Table 5", True),
    "prepare": Command(
        "prepare",
        "build the demo corpus, train a tokenizer, tokenize text into MDS shards (in parts, then merge them), "
        "or build a retrieval benchmark",
        True,
    ),
    "average": Command(
        "training",
        "average the weights of checkpoints (ModernBERT-base: its 3 best decay checkpoints and the last)",
        True,
    ),
    "merge": Command(
        "training", "merge checkpoints relative to a base checkpoint: linear (task arithmetic) or TIES", True
    ),
    "plot": Command("training", "draw loss, throughput and learning-rate curves of runs", True),
    "describe": Command("training", "validate a config's model section and summarise the encoder it builds", True),
    "data-order": Command(
        "data_order", "print the documents, shards and mask seed of one step of a pretraining run", True
    ),
    # The model side: pip install flexbert
    "registry": Command("registry", "list every block registry and its entries", False),
    "export-hf": Command("interop", "write a checkpoint as a transformers ModernBERT directory", False),
    "import-hf": Command("interop", "turn a transformers ModernBERT directory into a checkpoint to train from", False),
    "export-st": Command("interop", "write an embedding model as a sentence-transformers directory", False),
    "export-pylate": Command("interop", "write a late-interaction (ColBERT) model as a PyLate directory", False),
    "encode": Command("inference", "embed a corpus into .npy or Parquet shards", False),
    "eval-retrieval": Command(
        "inference",
        "rank a retrieval task's corpus with an embedding or ColBERT model: nDCG@10, MRR@10, recall@1/10/100",
        False,
    ),
}


class MissingExtraError(FlexBertError, ImportError):
    """A command needs a package that this install lacks."""


def _missing_extra(name: str, package: str) -> MissingExtraError:
    return MissingExtraError(f"flexbert {name} needs the training extra, and {package} is not installed: {TRAIN_EXTRA}")


def _load(name: str):
    """The module of command ``name``, or one line naming the extra that it needs. The training
    extra's packages are looked for before anything loads: some steps import one only when they get
    to it, and would otherwise fail half-way."""
    command = COMMANDS[name]
    if command.needs_train:
        missing = next((package for package in TRAINING_PACKAGES if importlib.util.find_spec(package) is None), None)
        if missing is not None:
            raise _missing_extra(name, missing)
    try:
        return importlib.import_module(f"flexbert.cli.{command.module}")
    except ModuleNotFoundError as err:
        if not command.needs_train or (err.name or "").startswith("flexbert"):
            raise
        raise _missing_extra(name, err.name) from None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser of every command, with the arguments of the one that ``argv`` names (a command's
    arguments are known only once its module is loaded)."""
    parser = argparse.ArgumentParser(
        prog="flexbert",
        description="FlexBERT: pretrain and fine-tune ModernBERT-style encoders. The model-side commands "
        f"(export-hf ... eval-retrieval) run on the core install; the others need {TRAIN_EXTRA}.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = argv[0] if argv else None
    for name, command in COMMANDS.items():
        subparser = commands.add_parser(name, help=command.summary, description=command.summary)
        if name == chosen:
            _load(name).PARSERS[name](subparser)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` (without the program name) parsed as ``flexbert`` parses it; argparse exits on an error."""
    argv = list(argv)
    parser = build_parser(argv)
    # argparse takes a command's positionals in one run, so key=value overrides written after an
    # option (train RECIPE --print-config x=1) would be refused; they are the command's overrides.
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        return args.run(args)
    except FlexBertError as err:  # bad input, named in one line; anything else is a bug and keeps its traceback
        print(f"flexbert: error: {err}", file=sys.stderr)
        return 2
