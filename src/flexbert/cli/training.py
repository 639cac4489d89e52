"""The training commands (``pip install 'flexbert[train]'``): ``train`` (what ``main.py`` runs),
``average`` and ``plot`` over a run's checkpoints and metrics, ``merge`` (checkpoints onto a base:
linear or TIES), and ``describe``, which shows what a recipe's model section builds."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from flexbert.core.checkpoint import MODEL_CONFIG_KEY, RunDir, model_from_checkpoint, write_weights
from flexbert.core.hf import read_published_encoder
from flexbert.core.model import FlexBertConfig, FlexBertForMaskedLM
from flexbert.core.object_storage import local_checkpoint
from flexbert.errors import CheckpointError, FlexBertError
from flexbert.train.averaging import average_weights, pick_checkpoints
from flexbert.train.init_from import resolve_continued_model
from flexbert.train.merging import DEFAULT_DENSITY, METHODS, merge_checkpoints, task_vector_merger
from flexbert.train.nan_guard import NonFiniteTrainingError
from flexbert.train.plotting import plot_run
from flexbert.train.recipes import parse_recipe
from flexbert.typed_config import ConfigError
from flexbert.yaml_config import load_yaml_config


def _cmd_describe(args: argparse.Namespace) -> int:

    raw = load_yaml_config(args.config, args.overrides)
    config = _described_model(raw)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = FlexBertForMaskedLM(config)
    kinds = "".join("G" if config.is_global_layer(i) else "L" for i in range(config.num_hidden_layers))
    print(f"{args.config}: {model.num_parameters():,} parameters")
    print(f"  layers {config.num_hidden_layers} (G = global, L = local window {config.local_attention}): {kinds}")
    print(
        f"  hidden {config.hidden_size}, heads {config.num_attention_heads}, "
        f"intermediate {config.intermediate_size}, vocab {config.vocab_size}"
    )
    print(f"  rope theta: global {config.global_rope_theta:g}, local {config.local_rope_theta:g}")
    print("  blocks: " + ", ".join(f"{k}={v}" for k, v in vars(config.blocks).items()))
    return 0


def _described_model(raw: dict) -> FlexBertConfig:
    """The model a recipe builds: its model: section, or the source it continues (init_from.hf)."""
    source_path = (raw.get("init_from") or {}).get("hf")
    if source_path is None:
        return FlexBertConfig.from_dict(raw.get("model"), path="model")
    try:
        source = read_published_encoder(source_path)
    except FlexBertError as err:
        raise ConfigError("init_from.hf", str(err)) from None
    tokenizer = (raw.get("train_loader") or {}).get("tokenizer")
    return resolve_continued_model(raw.get("model") or {}, source, tokenizer).config


def _configure_describe(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Validate the model: section of a YAML config and print its size and layout; for a recipe that "
        "continues a published encoder (init_from.hf), the source's architecture with the recipe's keys."
    )
    parser.add_argument("config", help="YAML file with a model: section")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.num_hidden_layers=4")
    parser.set_defaults(run=_cmd_describe)


def _cmd_train(args: argparse.Namespace) -> int:

    raw = load_yaml_config(args.config, args.overrides)
    # The composer launcher sets WORLD_SIZE, so batch divisibility is checked before any process
    # group or model exists.
    config, build = parse_recipe(raw, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    if args.print_config:
        print(OmegaConf.to_yaml(raw), end="")
        return 0
    trainer = build(config, raw)
    try:
        trainer.fit()
    except NonFiniteTrainingError as err:  # the run diverged: one line naming the step and its samples
        print(f"flexbert: error: {err}", file=sys.stderr)
        return 1
    finally:
        trainer.close()
    if int(os.environ.get("RANK", "0")) == 0:
        run_dir = config.run_dir
        print(f"run {config.run_name}: metrics in {run_dir.metrics_file} (plot them: flexbert plot {run_dir.path})")
    return 0


def _configure_train(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train a FlexBERT encoder from a YAML recipe. Run it on several GPUs with the "
        "Composer launcher: composer -n 8 main.py RECIPE.yaml [key=value ...]. The whole config is "
        "validated before anything is built; the resolved config is written to the run folder."
    )
    parser.add_argument("config", help="YAML recipe, e.g. yamls/pretrain-base.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optimizer.lr=5e-4")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(run=_cmd_train)


def _cmd_plot(args: argparse.Namespace) -> int:
    for path in [path for run_dir in args.run_dirs for path in plot_run(run_dir)]:
        print(path)
    return 0


def _configure_plot(parser: argparse.ArgumentParser) -> None:
    parser.description = "Read RUN_DIR/metrics.jsonl and write loss.png, throughput.png and lr.png to RUN_DIR/plots."
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's folder (holding metrics.jsonl)")
    parser.set_defaults(run=_cmd_plot)


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise CheckpointError(f"output {out} already exists; use --overwrite to replace it")


def _write_with_config(out: Path, model: FlexBertForMaskedLM, weights: dict[str, torch.Tensor]) -> None:
    """Write ``weights`` with ``model``'s config, so that the file exports alone; loading them into the
    model first checks that they are the model the config describes."""
    model.load_state_dict(weights)
    write_weights(out, weights, **{MODEL_CONFIG_KEY: dataclasses.asdict(model.config)})


def _export_hint(out: Path, tokenizer: Path | None) -> None:
    if tokenizer is not None:
        print(f"export it with: flexbert export-hf {out} OUT_DIR --tokenizer {tokenizer}")


def _cmd_average(args: argparse.Namespace) -> int:

    out = Path(args.out)
    _refuse_existing(out, args.overwrite)
    if bool(args.checkpoints) == bool(args.run_dir):
        raise CheckpointError("name the checkpoints to average, or a run folder with --run (not both)")
    if args.run_dir and not (args.best > 0 or args.last):
        raise CheckpointError("--run picks checkpoints by --best K and/or --last; give at least one")
    names = args.checkpoints  # local paths, or s3:// URIs (downloaded into a temporary folder)
    if not args.checkpoints:
        picked, unscored = pick_checkpoints(RunDir(Path(args.run_dir)), args.best, args.last)
        names = [str(path) for path in picked]
        for path in unscored:
            name = str(path).rpartition("/")[2]  # a local path, or a URI in object storage
            print(
                f"flexbert: note: --best passed over {name}: no eval loss was logged at its step "
                "(a save on SIGTERM, or one between evaluations)",
                file=sys.stderr,
            )
    with contextlib.ExitStack() as copies:
        paths = [copies.enter_context(local_checkpoint(name)) for name in names]
        model, tokenizer = model_from_checkpoint(paths[0])  # the config the average keeps, so it exports alone
        averaged = average_weights(paths)
    _write_with_config(out, model, averaged)
    print(f"{out}: the mean of {', '.join(names)}")
    _export_hint(out, tokenizer)
    return 0


def _configure_average(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write the element-wise mean of the model weights of CHECKPOINTs (files or FSDP shard "
        "folders), or of a run's K best checkpoints by the eval loss logged when each was saved, plus its "
        "last (--run RUN_DIR --best K --last). The result is one checkpoint, with its model config, that "
        "training loads with load_path and load_weights_only: true, and that export-hf exports."
    )
    parser.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT", help="checkpoints of one architecture")
    parser.add_argument(
        "--run", dest="run_dir", metavar="RUN_DIR", help="pick the checkpoints of this run folder instead"
    )
    parser.add_argument("--best", type=int, default=0, metavar="K", help="with --run: the K lowest eval losses")
    parser.add_argument("--last", action="store_true", help="with --run: and the last checkpoint")
    parser.add_argument("--out", required=True, metavar="OUT", help="the checkpoint file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.set_defaults(run=_cmd_average)


def _cmd_merge(args: argparse.Namespace) -> int:
    out = Path(args.out)
    _refuse_existing(out, args.overwrite)
    # The options are checked before any checkpoint is read (or downloaded).
    combine = task_vector_merger(args.method, len(args.checkpoints), args.weights, args.density, args.scale)
    with contextlib.ExitStack() as copies:
        base = copies.enter_context(local_checkpoint(args.base))  # a local path, or an s3:// URI downloaded
        paths = [copies.enter_context(local_checkpoint(name)) for name in args.checkpoints]
        model, tokenizer = model_from_checkpoint(base)  # the base's config is the merge's, so it exports alone
        merged = merge_checkpoints(base, paths, combine)
    _write_with_config(out, model, merged)
    print(f"{out}: the {args.method} merge of {', '.join(args.checkpoints)} onto {args.base}")
    _export_hint(out, tokenizer)
    return 0


def _numbers(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _configure_merge(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Merge CHECKPOINTs (files or FSDP shard folders, local or s3://) relative to a --base checkpoint "
        "of the same architecture: each CHECKPOINT's task vector (its weights minus the base's) is combined "
        "into one, and the result is the base plus --scale times it. --method linear sums the task vectors "
        "weighted by --weights (by default 1/N each: the mean of the CHECKPOINTs); --method ties is "
        "TIES-Merging (Yadav et al., 2023): each task vector trimmed to its --density largest entries of "
        "every tensor, each entry's sign elected by the sum of the trimmed values, and the mean of the "
        "trimmed values of that sign. Computed in float64, written in the base's dtypes as one checkpoint "
        "carrying the base's model config, that training loads with load_path and load_weights_only: true, "
        "and that export-hf exports."
    )
    parser.add_argument(
        "checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoints of the base's architecture to merge"
    )
    parser.add_argument(
        "--base", required=True, metavar="BASE", help="the checkpoint the task vectors are taken from and added to"
    )
    parser.add_argument(
        "--method",
        required=True,
        metavar="{" + ",".join(METHODS) + "}",
        help="linear: the weighted sum of the task vectors; ties: TIES-Merging (trim, elect sign, disjoint mean)",
    )
    parser.add_argument(
        "--weights",
        type=_numbers,
        metavar="W1,W2,...",
        help="with --method linear: one weight per CHECKPOINT, in their order (default: 1/N each, the mean); "
        "the result is (1 - their sum) times the base plus the weighted sum of the CHECKPOINTs",
    )
    parser.add_argument(
        "--density",
        type=float,
        metavar="K",
        help="with --method ties: the fraction of each tensor of each task vector kept, its largest entries "
        f"by magnitude, in (0, 1] (default: {DEFAULT_DENSITY}, the paper's top 20%%)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        metavar="LAMBDA",
        help="the multiple of the merged task vector added to the base (default: %(default)s)",
    )
    parser.add_argument("--out", required=True, metavar="OUT", help="the checkpoint file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.set_defaults(run=_cmd_merge)


PARSERS = {
    "train": _configure_train,
    "average": _configure_average,
    "merge": _configure_merge,
    "plot": _configure_plot,
    "describe": _configure_describe,
}
