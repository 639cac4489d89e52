"""The training commands (``pip install 'flexbert[train]'``): ``train`` (what ``main.py`` runs),
``average`` and ``plot`` over a run's checkpoints and metrics, and ``describe``, which shows what a
recipe's model section builds."""

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


def _cmd_average(args: argparse.Namespace) -> int:

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CheckpointError(f"output {out} already exists; use --overwrite to replace it")
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
    model.load_state_dict(averaged)
    write_weights(out, averaged, **{MODEL_CONFIG_KEY: dataclasses.asdict(model.config)})
    print(f"{out}: the mean of {', '.join(names)}")
    if tokenizer is not None:
        print(f"export it with: flexbert export-hf {out} OUT_DIR --tokenizer {tokenizer}")
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


PARSERS = {
    "train": _configure_train,
    "average": _configure_average,
    "plot": _configure_plot,
    "describe": _configure_describe,
}
