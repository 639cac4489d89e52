"""The commands that run many trainings (``pip install 'flexbert[train]'``): ``sweep`` over a grid or
random search of recipe keys, and ``glue``, ModernBERT's GLUE protocol."""

from __future__ import annotations

import argparse

from flexbert.train.glue import run_glue
from flexbert.train.sweep import run_sweep


def _cmd_sweep(args: argparse.Namespace) -> int:
    return run_sweep(args.sweep, args.out, args.dry_run, args.nproc)


def _configure_sweep(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Expand a sweep file (base recipe, fixed overrides, grid:, random:) into named runs, "
        "validate them all, then train them one after another under OUT/<run_name>, skipping runs an "
        "earlier attempt finished. The final metrics go to OUT/results.csv and, as mean ± std over "
        "seeds, OUT/summary.md. Exits 1 if any run failed."
    )
    parser.add_argument("sweep", metavar="SWEEP.yaml", help="sweep file, e.g. yamls/sweeps/stsb-lr-seed.yaml")
    parser.add_argument("--out", metavar="DIR", help="where runs and results go (default: runs/sweeps/<sweep name>)")
    parser.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train each run on N processes (GPUs), launched with composer -n N "
        "(default: the sweep file's nproc, else 1)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="write OUT/configs/<run>.yaml and OUT/commands.txt (one line per run) and train nothing",
    )
    parser.set_defaults(run=_cmd_sweep)


def _cmd_glue(args: argparse.Namespace) -> int:
    return run_glue(
        args.model, args.data, args.out, args.protocol, args.tasks, args.overrides, args.nproc, args.dry_run
    )


def _configure_glue(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the protocol file's tasks (default: ModernBERT's GLUE protocol, learning rate x weight "
        "decay x epochs x seeds, early stopping) as fine-tuning runs of MODEL under OUT/<task>/<run>, tasks that "
        "start from another (RTE, MRPC, STS-B from MNLI) on its best run's best checkpoint. Each task's setting "
        "with the best dev score averaged over seeds is chosen; OUT/glue.md holds Table 5 (each task's score "
        "and their average) and every choice, OUT/glue.csv the same. Finished runs are skipped when run again. "
        "Exits 1 if any run failed."
    )
    parser.add_argument("model", metavar="MODEL", help="a checkpoint of this project, or a Hugging Face ModernBERT dir")
    parser.add_argument("--data", required=True, metavar="GLUE_DIR", help="GLUE's TSV folders (CoLA/, SST-2/, ...)")
    parser.add_argument("--out", metavar="DIR", help="where runs and tables go (default: runs/glue/<MODEL name>)")
    parser.add_argument(
        "--protocol",
        metavar="FILE",
        help="tasks, grid, seeds and patience (default: ModernBERT's, yamls/sweeps/glue-paper.yaml)",
    )
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="only these tasks of the protocol (e.g. mnli rte)")
    parser.add_argument(
        "--nproc", type=int, metavar="N", help="train each run on N processes (default: the protocol's)"
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="write OUT/commands.txt with every run that can start now, and train nothing; run it again once "
        "they finished to plan the tasks that start from them",
    )
    parser.add_argument("overrides", nargs="*", help="key=value for every run, e.g. batch_size=16 precision=amp_bf16")
    parser.set_defaults(run=_cmd_glue)


PARSERS = {"sweep": _configure_sweep, "glue": _configure_glue}
