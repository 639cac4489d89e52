"""Sweeps: one recipe trained many times, over a grid and/or a random search of its config keys.

A sweep file names a base recipe (relative to the sweep file), fixed overrides, a ``grid:`` whose
cartesian product is taken, and a ``random:`` search whose draws are crossed with that product, so
a random search over learning rates can still be repeated over seeds. Every run is one ``flexbert
train`` process with dotlist overrides, named after its swept values (``stsb-lr8e-05-seed1``) and
writing to ``OUT/<run_name>/``. All runs are validated before the first one starts, since a typo
found after hours of training wastes them. The final value of the named metrics of every run is
collected into ``OUT/results.csv`` and, as mean ± std over the seed-like keys, ``OUT/summary.md``.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf

from flexbert.train.loggers import read_metrics
from flexbert.train.recipes import parse_recipe
from flexbert.typed_config import ConfigError, from_dict
from flexbert.yaml_config import load_yaml_config

DONE = "DONE"  # written into a run's folder once it exited successfully: resuming skips it
RESERVED = {
    "run_name": "the sweep names each run after its swept values",
    "run_root": "runs go under the sweep's output folder (--out)",
    "recipe": "several recipes are listed under the top-level recipe: key",
}


@dataclass
class RandomParam:
    distribution: Literal["loguniform", "uniform", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    def validate(self, path: str) -> None:
        if self.distribution == "choice":
            if not self.values:
                raise ConfigError(f"{path}.values", "a choice needs a non-empty list of values")
            if self.low is not None or self.high is not None:
                raise ConfigError(path, "a choice takes values, not low/high")
            return
        if self.low is None or self.high is None or self.values is not None:
            raise ConfigError(path, f"a {self.distribution} distribution takes low and high, not values")
        if not self.low < self.high:
            raise ConfigError(f"{path}.low", f"must be below high={self.high}, got {self.low}")
        if self.distribution == "loguniform" and self.low <= 0:
            raise ConfigError(f"{path}.low", f"a loguniform distribution needs low > 0, got {self.low}")

    def draw(self, rng: random.Random) -> Any:
        if self.distribution == "choice":
            return rng.choice(self.values)
        if self.distribution == "loguniform":
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        # Three significant digits are finer than any sweep resolves, and keep the run name, which
        # spells the value out, both short and exact.
        return float(f"{value:.3g}")


@dataclass
class RandomSearch:
    samples: int
    params: dict[str, RandomParam]
    seed: int = 0

    def validate(self, path: str) -> None:
        if self.samples < 1:
            raise ConfigError(f"{path}.samples", f"must be at least 1, got {self.samples}")
        if not self.params:
            raise ConfigError(f"{path}.params", "no parameters to draw")

    def draws(self) -> list[dict[str, Any]]:
        rng = random.Random(self.seed)
        return [{key: param.draw(rng) for key, param in self.params.items()} for _ in range(self.samples)]


@dataclass
class SweepSpec:
    recipe: str | list[str]  # a list is swept too, as the outermost dimension
    metrics: list[str]  # metrics.jsonl keys whose final values are collected, e.g. metrics/eval/spearman
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, the same in every run
    grid: dict[str, list[Any]] = field(default_factory=dict)
    random: RandomSearch | None = None
    seed_keys: list[str] | None = None  # swept keys averaged over in the summary; default: seed
    nproc: int = 1  # processes per run: above 1, each run is launched with `composer -n nproc`

    @property
    def recipes(self) -> list[str]:
        return [self.recipe] if isinstance(self.recipe, str) else self.recipe

    @property
    def swept_keys(self) -> list[str]:
        """Every key that varies between runs, in the order the run names spell them."""
        recipe = [] if isinstance(self.recipe, str) else ["recipe"]
        return [*recipe, *self.grid, *(self.random.params if self.random else {})]

    @property
    def group_keys(self) -> list[str]:
        seeds = self.seed_keys if self.seed_keys is not None else ["seed"]
        return [key for key in self.swept_keys if key not in seeds]

    def validate(self, path: str) -> None:
        if self.nproc < 1:
            raise ConfigError(f"{path}.nproc", f"must be at least 1, got {self.nproc}")
        if not self.recipes:
            raise ConfigError(f"{path}.recipe", "no recipe given")
        if not self.metrics:
            raise ConfigError("sweep.metrics", "name at least one metric to collect, e.g. metrics/eval/spearman")
        if not self.grid and self.random is None:
            raise ConfigError(
                "sweep.grid", "nothing to sweep: give a grid: of key -> list of values, and/or a random: search"
            )
        for key, values in self.grid.items():
            if not values:
                raise ConfigError(f"sweep.grid.{key}", "no values")
        sections = [
            ("overrides", self.overrides),
            ("grid", self.grid),
            ("random.params", self.random.params if self.random else {}),
        ]
        for (name, keys), (other, other_keys) in itertools.combinations(sections, 2):
            for key in keys.keys() & other_keys.keys():
                raise ConfigError(f"sweep.{other}.{key}", f"is also set in sweep.{name}; give each key once")
        for name, keys in sections:
            for key in keys.keys() & RESERVED.keys():
                raise ConfigError(f"sweep.{name}.{key}", f"cannot be set here: {RESERVED[key]}")
        for key in self.seed_keys or []:
            if key not in self.swept_keys:
                raise ConfigError("sweep.seed_keys", f"{key!r} is not swept; swept keys: {', '.join(self.swept_keys)}")


def load_sweep(path: str | Path) -> SweepSpec:
    """A validated sweep file whose recipes exist (named relative to it)."""
    spec = from_dict(SweepSpec, load_yaml_config(path), "sweep")
    for recipe in spec.recipes:
        if not (Path(path).parent / recipe).is_file():
            raise ConfigError(
                "sweep.recipe", f"{Path(path).parent / recipe} not found (recipes are named relative to the sweep file)"
            )
    return spec


@dataclass
class Run:
    name: str
    recipe: str
    swept: dict[str, Any]  # the values of the spec's swept keys
    overrides: list[str]  # key=value, as on the train command line
    folder: Path  # the run's folder (run_root/run_name), where DONE marks it finished
    nproc: int = 1

    def command(self) -> list[str]:
        train = ["-m", "flexbert.cli", "train", self.recipe, *self.overrides]
        if self.nproc == 1:
            return [sys.executable, *train]
        # The launcher picks a free port for each run, so runs never collide on a stale one.
        return [str(Path(sys.executable).with_name("composer")), "-n", str(self.nproc), *train]


def _dotlist_value(value: Any) -> str:
    """A value written so that OmegaConf's dotlist parser reads it back unchanged (JSON is YAML)."""
    if isinstance(value, str) and OmegaConf.from_dotlist([f"v={value}"]).v == value:
        return value
    return json.dumps(value)


def _name_part(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each key by its last component (optimizer.lr -> lr), or in full where two would clash."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: tail if last.count(tail) == 1 else key.replace(".", "_") for key, tail in zip(keys, last)}


def expand(spec: SweepSpec, sweep_file: str | Path, out: str | Path) -> list[Run]:
    """The runs of a sweep, in a fixed order: recipe, then random draw, then grid point."""
    sweep_dir = Path(sweep_file).parent
    grid_points = [dict(zip(spec.grid, values)) for values in itertools.product(*spec.grid.values())]
    draws = spec.random.draws() if spec.random else [{}]
    config_keys = [key for key in spec.swept_keys if key != "recipe"]
    short = _short_keys(config_keys)
    fixed = [f"{key}={_dotlist_value(value)}" for key, value in spec.overrides.items()]
    runs: dict[str, Run] = {}
    for recipe, draw, point in itertools.product(spec.recipes, draws, grid_points):
        values = {**point, **draw}
        name = "-".join([Path(recipe).stem, *(f"{short[key]}{_name_part(values[key])}" for key in config_keys)])
        swept = {"recipe": recipe, **values} if "recipe" in spec.swept_keys else values
        if name in runs:
            raise ConfigError(
                "sweep",
                f"two runs would be named {name}: {runs[name].swept} and {swept} "
                "(a random search can draw the same choices twice)",
            )
        overrides = [
            *fixed,
            *(f"{key}={_dotlist_value(values[key])}" for key in config_keys),
            f"run_name={name}",
            f"run_root={_dotlist_value(str(out))}",
        ]
        runs[name] = Run(name, os.path.normpath(sweep_dir / recipe), swept, overrides, Path(out) / name, spec.nproc)
    return list(runs.values())


def resolve(run: Run) -> dict[str, Any]:
    """The run's full config, checked exactly as ``flexbert train`` checks it before training on
    ``run.nproc`` processes.

    A pretraining recipe thus needs its tokenizer and local MDS shards where the sweep is planned
    (remote streams are not opened).
    """
    raw = load_yaml_config(run.recipe, run.overrides)
    try:
        parse_recipe(raw, world_size=run.nproc)
    except ConfigError as err:
        swept = ", ".join(f"{key}={value}" for key, value in run.swept.items())
        raise ConfigError(f"run {run.name} ({swept})", str(err)) from None
    return raw


def write_plan(runs: Sequence[Run], configs: Sequence[dict[str, Any]], out: Path) -> None:
    """``--dry-run``: every run's resolved config, and one shell line per run for a scheduler.

    Each line marks its run finished as the sweep itself would, so that running the sweep again
    afterwards skips what the cluster finished and collects the results.
    """
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for run, config in zip(runs, configs):
        (out / "configs" / f"{run.name}.yaml").write_text(OmegaConf.to_yaml(config))
    cwd = shlex.quote(os.getcwd())
    lines = [f"cd {cwd} && {shlex.join(run.command())} && touch {shlex.quote(str(run.folder / DONE))}" for run in runs]
    (out / "commands.txt").write_text("\n".join(lines) + "\n")


def _train(run: Run, tag: str) -> bool:
    """One run in its own process, its output in ``train.log`` in its folder; whether it succeeded."""
    run_dir = run.folder
    if run_dir.exists():  # an attempt that never finished: start again from nothing
        shutil.rmtree(run_dir)
        print(f"{tag}: removed the unfinished folder of an earlier attempt", flush=True)
    run_dir.mkdir(parents=True)
    log = run_dir / "train.log"
    print(f"{tag}: running (log: {log})", flush=True)
    with log.open("w") as stream:
        code = subprocess.run(run.command(), stdout=stream, stderr=subprocess.STDOUT).returncode
    if code == 0:
        (run_dir / DONE).touch()
        return True
    tail = log.read_text(errors="replace").splitlines()[-5:]
    print(f"{tag}: exit code {code}; the end of {log}:\n" + "\n".join(f"    {line}" for line in tail), flush=True)
    return False


def execute(run: Run, tag: str, metrics: Sequence[str]) -> dict[str, Any]:
    """Train ``run`` unless an earlier attempt finished it; its results row: name, status ("done" or
    "failed"), swept values and the final value of each of ``metrics``."""
    start = time.monotonic()
    earlier = (run.folder / DONE).is_file()
    status = "done" if earlier or _train(run, tag) else "failed"
    values = final_metrics(run.folder, metrics) if status == "done" else dict.fromkeys(metrics)
    when = "finished earlier, skipped" if earlier else f"{status.upper()} in {time.monotonic() - start:.1f} s"
    shown = ", ".join(f"{name} {'missing' if value is None else f'{value:.4g}'}" for name, value in values.items())
    print(f"{tag}: {when}" + (f"; {shown}" if status == "done" else ""), flush=True)
    return {"run_name": run.name, "status": status, **run.swept, **values}


def refuse_launcher(command: str) -> None:
    """A sweep or a GLUE run is one process that launches its runs; under ``composer -n N`` every
    rank would launch them all."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            command,
            "runs as one process that launches every run; to train each run on N "
            "processes, give --nproc N instead of a launcher",
        )


def final_metrics(run_dir: str | Path, names: Sequence[str]) -> dict[str, float | None]:
    """The last logged value of each named metric, or None where the run never logged it."""
    try:
        rows = read_metrics(run_dir)
    except (FileNotFoundError, ValueError):
        rows = []
    return {name: next((row[name] for row in reversed(rows) if name in row), None) for name in names}


def _cell(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else json.dumps(value)


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}"


def summary_table(rows: Sequence[dict[str, Any]], group_keys: Sequence[str], metrics: Sequence[str]) -> str:
    """A markdown table with one line per setting of ``group_keys``: each metric's mean ± sample
    standard deviation over the finished runs of that setting (the seeds), and their count ``n``."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(_cell(row[key]) for key in group_keys), []).append(row)
    header = [*group_keys, *metrics, "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for setting, members in groups.items():
        finished = [row for row in members if row["status"] == "done"]
        cells = [_mean_std([row[m] for row in finished if row[m] is not None]) for m in metrics]
        lines.append("| " + " | ".join([*setting, *cells, str(len(finished))]) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, title: str, spec: SweepSpec, rows: Sequence[dict[str, Any]]) -> None:
    columns = ["run_name", "status", *spec.swept_keys, *spec.metrics]
    with (out / "results.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        writer.writerows({key: _cell(row[key]) for key in columns} for row in rows)
    averaged = [key for key in spec.swept_keys if key not in spec.group_keys]
    note = f"mean ± std over {', '.join(averaged)}" if averaged else "one run per setting"
    (out / "summary.md").write_text(
        f"# Sweep {title}\n\nFinal metric values, {note}; n = finished runs.\n\n"
        + summary_table(rows, spec.group_keys, spec.metrics)
    )


def run_sweep(
    sweep_file: str | Path, out: str | Path | None = None, dry_run: bool = False, nproc: int | None = None
) -> int:
    """Validate every run, then plan them (``dry_run``) or train them one after another, each on
    ``nproc`` processes (default: the sweep file's ``nproc``); 0 when every run finished, 1 when any
    failed."""
    refuse_launcher("sweep")
    sweep_file = Path(sweep_file)
    title = sweep_file.stem
    out = Path(out) if out is not None else Path("runs", "sweeps", title)
    spec = load_sweep(sweep_file)
    if nproc is not None:
        if nproc < 1:
            raise ConfigError("--nproc", f"must be at least 1, got {nproc}")
        spec.nproc = nproc
    runs = expand(spec, sweep_file, out)
    print(f"sweep {title}: validating {len(runs)} runs (swept: {', '.join(spec.swept_keys)})", flush=True)
    configs = [resolve(run) for run in runs]
    if dry_run:
        write_plan(runs, configs, out)
        print(f"sweep {title}: configs in {out / 'configs'}, one command per run in {out / 'commands.txt'}")
        return 0
    rows = [execute(run, f"[{index}/{len(runs)}] {run.name}", spec.metrics) for index, run in enumerate(runs, 1)]
    write_report(out, title, spec, rows)
    failed = sum(row["status"] == "failed" for row in rows)
    print(
        f"sweep {title}: {len(rows) - failed} done, {failed} failed; {out / 'results.csv'}, {out / 'summary.md'}",
        flush=True,
    )
    return 1 if failed else 0
