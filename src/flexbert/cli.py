"""The ``flexbert`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from flexbert.colbert import add_export_pylate_command
from flexbert.embedders import add_export_st_command
from flexbert.encode import add_encode_command
from flexbert.errors import FlexBertError
from flexbert.prepare import add_prepare_commands
from flexbert.retrieval import add_eval_retrieval_command
from flexbert.typed_config import load_yaml_config


def _cmd_registry(args: argparse.Namespace) -> int:
    import flexbert.model  # noqa: F401  (registers the built-in blocks)
    import flexbert.train.optimizers  # noqa: F401  (and the optimizers and schedulers)
    import flexbert.train.schedulers  # noqa: F401
    from flexbert.registry import CATALOGUE, import_plugins

    import_plugins(args.plugins, key_path="--plugins")
    for registry in CATALOGUE:
        if args.family and registry.family not in args.family:
            continue
        print(f"{registry.family}: {registry.description}")
        print(f"  factory: {registry.signature}")
        for entry in registry.entries():
            print(f"  - {entry.name:<20} {entry.description}")
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    import torch

    from flexbert.model import FlexBertConfig, FlexBertForMaskedLM

    raw = load_yaml_config(args.config, args.overrides)
    config = FlexBertConfig.from_dict(raw.get("model"), path="model")
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


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from omegaconf import OmegaConf

    from flexbert.train.nan_guard import NonFiniteTrainingError
    from flexbert.train.recipes import parse_recipe

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


def _cmd_sweep(args: argparse.Namespace) -> int:
    from flexbert.sweep import run_sweep

    return run_sweep(args.sweep, args.out, args.dry_run, args.nproc)


def _cmd_glue(args: argparse.Namespace) -> int:
    from flexbert.glue import run_glue

    return run_glue(
        args.model, args.data, args.out, args.protocol, args.tasks, args.overrides, args.nproc, args.dry_run
    )


def _cmd_plot(args: argparse.Namespace) -> int:
    from flexbert.train.plotting import plot_run

    for path in [path for run_dir in args.run_dirs for path in plot_run(run_dir)]:
        print(path)
    return 0


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from flexbert.hf import export_hf, export_notes
    from flexbert.train.checkpoint import model_from_checkpoint

    training_config = load_yaml_config(args.config) if args.config else None
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


def _cmd_import_hf(args: argparse.Namespace) -> int:
    from flexbert.hf import import_hf

    checkpoint = import_hf(args.hf_dir, args.out_checkpoint, overwrite=args.overwrite)
    print(f"{checkpoint} (train from it with load_path: {checkpoint} and load_weights_only: true)")
    return 0


def _cmd_average(args: argparse.Namespace) -> int:
    import dataclasses

    from flexbert.errors import CheckpointError
    from flexbert.train.averaging import average_weights, pick_checkpoints
    from flexbert.train.checkpoint import MODEL_CONFIG_KEY, RunDir, model_from_checkpoint, write_weights

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CheckpointError(f"output {out} already exists; use --overwrite to replace it")
    if bool(args.checkpoints) == bool(args.run_dir):
        raise CheckpointError("name the checkpoints to average, or a run folder with --run (not both)")
    if args.run_dir and not (args.best > 0 or args.last):
        raise CheckpointError("--run picks checkpoints by --best K and/or --last; give at least one")
    paths = [Path(path) for path in args.checkpoints] or pick_checkpoints(
        RunDir(Path(args.run_dir)), args.best, args.last
    )
    model, tokenizer = model_from_checkpoint(paths[0])  # the config the average keeps, so it exports alone
    averaged = average_weights(paths)
    model.load_state_dict(averaged)
    write_weights(out, averaged, **{MODEL_CONFIG_KEY: dataclasses.asdict(model.config)})
    print(f"{out}: the mean of {', '.join(str(path) for path in paths)}")
    if tokenizer is not None:
        print(f"export it with: flexbert export-hf {out} OUT_DIR --tokenizer {tokenizer}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexbert", description="FlexBERT: pretrain and fine-tune ModernBERT-style encoders."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    registry = commands.add_parser(
        "registry",
        help="list every block registry and its entries",
        description="List the registered blocks that a config's model.blocks section can name.",
    )
    registry.add_argument("family", nargs="*", help="only these registries (default: all)")
    registry.add_argument(
        "--plugins",
        nargs="+",
        default=[],
        metavar="MODULE",
        help="import these modules first, so their blocks are listed too",
    )
    registry.set_defaults(run=_cmd_registry)

    describe = commands.add_parser(
        "describe",
        help="validate a config's model section and summarise the encoder it builds",
        description="Validate the model: section of a YAML config and print its size and layout.",
    )
    describe.add_argument("config", help="YAML file with a model: section")
    describe.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.num_hidden_layers=4")
    describe.set_defaults(run=_cmd_describe)

    train = commands.add_parser(
        "train",
        help="train from a YAML recipe (what main.py runs)",
        description="Train a FlexBERT encoder from a YAML recipe. Run it on several GPUs with the "
        "Composer launcher: composer -n 8 main.py RECIPE.yaml [key=value ...]. The whole config is "
        "validated before anything is built; the resolved config is written to the run folder.",
    )
    train.add_argument("config", help="YAML recipe, e.g. yamls/pretrain-base.yaml")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optimizer.lr=5e-4")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(run=_cmd_train)

    sweep = commands.add_parser(
        "sweep",
        help="train a recipe over a grid and/or random search of its config keys",
        description="Expand a sweep file (base recipe, fixed overrides, grid:, random:) into named runs, "
        "validate them all, then train them one after another under OUT/<run_name>, skipping runs an "
        "earlier attempt finished. The final metrics go to OUT/results.csv and, as mean ± std over "
        "seeds, OUT/summary.md. Exits 1 if any run failed.",
    )
    sweep.add_argument("sweep", metavar="SWEEP.yaml", help="sweep file, e.g. yamls/sweeps/stsb-lr-seed.yaml")
    sweep.add_argument("--out", metavar="DIR", help="where runs and results go (default: runs/sweeps/<sweep name>)")
    sweep.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train each run on N processes (GPUs), launched with composer -n N "
        "(default: the sweep file's nproc, else 1)",
    )
    sweep.add_argument(
        "--dry-run",
        action="store_true",
        help="write OUT/configs/<run>.yaml and OUT/commands.txt (one line per run) and train nothing",
    )
    sweep.set_defaults(run=_cmd_sweep)

    glue = commands.add_parser(
        "glue",
        help="fine-tune a model on GLUE as ModernBERT's paper did, and write its Table 5",
        description="Run the protocol file's tasks (default: ModernBERT's GLUE protocol, learning rate x weight "
        "decay x epochs x seeds, early stopping) as fine-tuning runs of MODEL under OUT/<task>/<run>, tasks that "
        "start from another (RTE, MRPC, STS-B from MNLI) on its best run's best checkpoint. Each task's setting "
        "with the best dev score averaged over seeds is chosen; OUT/glue.md holds Table 5 (each task's score "
        "and their average) and every choice, OUT/glue.csv the same. Finished runs are skipped when run again. "
        "Exits 1 if any run failed.",
    )
    glue.add_argument("model", metavar="MODEL", help="a checkpoint of this project, or a Hugging Face ModernBERT dir")
    glue.add_argument("--data", required=True, metavar="GLUE_DIR", help="GLUE's TSV folders (CoLA/, SST-2/, ...)")
    glue.add_argument("--out", metavar="DIR", help="where runs and tables go (default: runs/glue/<MODEL name>)")
    glue.add_argument(
        "--protocol",
        metavar="FILE",
        help="tasks, grid, seeds and patience (default: ModernBERT's, yamls/sweeps/glue-paper.yaml)",
    )
    glue.add_argument("--tasks", nargs="+", metavar="TASK", help="only these tasks of the protocol (e.g. mnli rte)")
    glue.add_argument("--nproc", type=int, metavar="N", help="train each run on N processes (default: the protocol's)")
    glue.add_argument(
        "--dry-run",
        action="store_true",
        help="write OUT/commands.txt with every run that can start now, and train nothing; run it again once "
        "they finished to plan the tasks that start from them",
    )
    glue.add_argument("overrides", nargs="*", help="key=value for every run, e.g. batch_size=16 precision=amp_bf16")
    glue.set_defaults(run=_cmd_glue)

    plot = commands.add_parser(
        "plot",
        help="draw loss, throughput and learning-rate curves of runs",
        description="Read RUN_DIR/metrics.jsonl and write loss.png, throughput.png and lr.png to RUN_DIR/plots.",
    )
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's folder (holding metrics.jsonl)")
    plot.set_defaults(run=_cmd_plot)

    export_hf = commands.add_parser(
        "export-hf",
        help="write a checkpoint as a transformers ModernBERT directory",
        description="Write a Composer checkpoint of this project as config.json, model.safetensors and "
        "tokenizer files that transformers' AutoModelForMaskedLM loads. The model config comes from "
        "--config, else from the checkpoint (import-hf stores it), else from the run folder's config.json.",
    )
    export_hf.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="Composer checkpoint, e.g. runs/NAME/checkpoints/latest-rank0.pt"
    )
    export_hf.add_argument("out_dir", metavar="OUT_DIR", help="the Hugging Face directory to write")
    export_hf.add_argument(
        "--config", metavar="RECIPE.yaml", help="the recipe the checkpoint was trained with (or its run's config.json)"
    )
    export_hf.add_argument("--tokenizer", metavar="DIR", help="tokenizer to ship (default: the training one)")
    export_hf.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    export_hf.set_defaults(run=_cmd_export_hf)

    import_hf = commands.add_parser(
        "import-hf",
        help="turn a transformers ModernBERT directory into a checkpoint to train from",
        description="Write the weights of a ModernBertForMaskedLM directory as a Composer-style checkpoint "
        "that a recipe loads with load_path and load_weights_only: true.",
    )
    import_hf.add_argument("hf_dir", metavar="HF_DIR", help="a local ModernBERT directory (config.json, weights)")
    import_hf.add_argument(
        "out_checkpoint", metavar="OUT_CHECKPOINT", help="the checkpoint file to write, e.g. modernbert-base.pt"
    )
    import_hf.add_argument("--overwrite", action="store_true", help="replace an existing OUT_CHECKPOINT")
    import_hf.set_defaults(run=_cmd_import_hf)

    average = commands.add_parser(
        "average",
        help="average the weights of checkpoints (ModernBERT-base: its 3 best decay checkpoints and the last)",
        description="Write the element-wise mean of the model weights of CHECKPOINTs (files or FSDP shard "
        "folders), or of a run's K best checkpoints by the eval loss logged when each was saved, plus its "
        "last (--run RUN_DIR --best K --last). The result is one checkpoint, with its model config, that "
        "training loads with load_path and load_weights_only: true, and that export-hf exports.",
    )
    average.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT", help="checkpoints of one architecture")
    average.add_argument(
        "--run", dest="run_dir", metavar="RUN_DIR", help="pick the checkpoints of this run folder instead"
    )
    average.add_argument("--best", type=int, default=0, metavar="K", help="with --run: the K lowest eval losses")
    average.add_argument("--last", action="store_true", help="with --run: and the last checkpoint")
    average.add_argument("--out", required=True, metavar="OUT", help="the checkpoint file to write")
    average.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    average.set_defaults(run=_cmd_average)

    add_prepare_commands(commands)
    add_eval_retrieval_command(commands)
    add_export_st_command(commands)
    add_export_pylate_command(commands)
    add_encode_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # argparse takes a command's positionals in one run, so key=value overrides written after an
    # option (train RECIPE --print-config x=1) would be refused; they are the command's overrides.
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.run(args)
    except FlexBertError as err:  # bad input, named in one line; anything else is a bug and keeps its traceback
        print(f"flexbert: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
