"""GLUE as ModernBERT's paper ran it (appendix E.1), ending in its Table 5.

A protocol file (``yamls/sweeps/glue-paper.yaml``) names each task's recipe and the grid: learning
rate × weight decay × epochs × seeds. Every grid point of every task is one fine-tuning run with
early stopping, trained as a sweep trains its runs (one process each, resumable, ``--dry-run`` for a
cluster). A task's score is the best evaluation of its first metric on its first eval split
(``metrics/<split>/best_<metric>``, which early stopping logs); the chosen setting is the one with the
highest score averaged over its seeds. Tasks that ``start_from`` another (RTE, MRPC and STS-B from
MNLI) load the best evaluation's weights (``checkpoints/best.pt``) of that task's chosen setting's
best seed, so they run once every run of their source has finished.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from flexbert.core.checkpoint import is_sharded, model_from_checkpoint
from flexbert.core.hf import hf_dir_config
from flexbert.errors import MissingFileError
from flexbert.train.finetune import epoch_fraction
from flexbert.train.sweep import (
    DONE,
    Run,
    SweepSpec,
    execute,
    expand,
    final_metrics,
    refuse_launcher,
    resolve,
    write_plan,
    write_report,
)
from flexbert.typed_config import ConfigError, from_dict
from flexbert.yaml_config import load_yaml_config

DEFAULT_PROTOCOL = Path("yamls", "sweeps", "glue-paper.yaml")  # relative to where flexbert runs
SETTING_KEYS = ["optimizer.lr", "optimizer.weight_decay", "max_duration"]  # what a task's choice fixes


@dataclass
class GlueTask:
    recipe: str  # relative to the protocol file
    title: str  # the column heading of Table 5
    epochs: list[int]
    start_from: str | None = None  # a task whose best checkpoint this one fine-tunes
    # The protocol's grid, narrowed for this task where given.
    learning_rates: list[float] | None = None
    weight_decays: list[float] | None = None
    seeds: list[int] | None = None

    def validate(self, path: str) -> None:
        for key in ("epochs", "learning_rates", "weight_decays", "seeds"):
            if getattr(self, key) == []:
                raise ConfigError(f"{path}.{key}", "no values")
        if any(epochs < 1 for epochs in self.epochs):
            raise ConfigError(f"{path}.epochs", f"must all be at least 1, got {self.epochs}")


@dataclass
class GlueProtocol:
    tasks: dict[str, GlueTask]  # in Table 5's column order
    learning_rates: list[float]
    weight_decays: list[float]
    seeds: list[int]
    patience: int = 2  # early stopping: evaluations without a new best before a run stops
    # Several evaluations per epoch, so that patience can stop a run of 1 to 3 epochs.
    eval_interval: str = "0.25ep"
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, in every run
    nproc: int = 1  # processes per run (composer -n nproc)

    def validate(self, path: str) -> None:
        for key in ("tasks", "learning_rates", "weight_decays", "seeds"):
            if not getattr(self, key):
                raise ConfigError(f"{path}.{key}", "no values")
        if self.patience < 1 or self.nproc < 1:
            raise ConfigError(path, "patience and nproc must be at least 1")
        if not (epoch_fraction(self.eval_interval) or 0) > 0:
            raise ConfigError(
                f"{path}.eval_interval", f"must be a part of an epoch such as 0.25ep, got {self.eval_interval!r}"
            )
        for name, task in self.tasks.items():
            source = task.start_from
            if source is None:
                continue
            if source not in self.tasks or source == name:
                raise ConfigError(f"{path}.tasks.{name}.start_from", f"{source!r} is not another task of the protocol")
            if self.tasks[source].start_from is not None:
                raise ConfigError(
                    f"{path}.tasks.{name}.start_from", f"{source} starts from another task itself; chain one step only"
                )

    def grid(self, task: GlueTask) -> dict[str, list[Any]]:
        return {
            "optimizer.lr": task.learning_rates or self.learning_rates,
            "optimizer.weight_decay": task.weight_decays or self.weight_decays,
            "max_duration": [f"{epochs}ep" for epochs in task.epochs],
            "seed": task.seeds or self.seeds,
        }

    @property
    def sources(self) -> set[str]:
        return {task.start_from for task in self.tasks.values() if task.start_from is not None}


def load_protocol(path: str | Path) -> GlueProtocol:
    if not Path(path).is_file():
        raise ConfigError(str(path), "GLUE protocol not found (run from the project root, or give --protocol FILE)")
    protocol = from_dict(GlueProtocol, load_yaml_config(path), "glue")
    for name, task in protocol.tasks.items():
        if not (Path(path).parent / task.recipe).is_file():
            raise ConfigError(f"glue.tasks.{name}.recipe", f"{Path(path).parent / task.recipe} not found")
    return protocol


# --- the model every task starts from ----------------------------------------------------------------


def model_overrides(model_path: str) -> dict[str, Any]:
    """``load_path``, ``model`` (the architecture MODEL holds, replacing the recipe's preset) and, where
    MODEL names it, ``tokenizer``: the keys that point each task's recipe at MODEL."""
    path = Path(model_path)
    if not path.exists():
        raise MissingFileError(f"model not found: {path}")
    if path.is_dir() and not is_sharded(path):
        config, tokenizer = hf_dir_config(path), path if (path / "tokenizer.json").is_file() else None
    else:
        model, tokenizer = model_from_checkpoint(path)  # reads every weight: a broken file stops us here
        config = model.config
    # The kernel is chosen where each run trains.
    model = {**dataclasses.asdict(config), "preset": None, "attn_backend": "auto"}
    return {"load_path": str(path), "model": model, **({"tokenizer": str(tokenizer)} if tokenizer else {})}


# --- one task: its runs, and the setting chosen among them ------------------------------------------------


@dataclass
class TaskPlan:
    name: str
    task: GlueTask
    spec: SweepSpec
    runs: list[Run]
    score: str  # metrics/<split>/best_<metric>


def score_metric(raw: dict[str, Any]) -> str:
    """The key early stopping logs for a resolved fine-tuning recipe: its first eval split's best
    value of its first metric."""
    return f"metrics/{next(iter(raw['eval_splits']))}/best_{raw['task']['metrics'][0]}"


def plan_task(protocol: GlueProtocol, protocol_file: Path, name: str, overrides: dict[str, Any], out: Path) -> TaskPlan:
    task = protocol.tasks[name]
    early_stopping = {"patience": protocol.patience, "save_best": name in protocol.sources}
    fixed = {
        "eval_interval": protocol.eval_interval,
        **protocol.overrides,
        **overrides,
        "early_stopping": early_stopping,
    }
    raw = load_yaml_config(protocol_file.parent / task.recipe, [f"{key}={json.dumps(v)}" for key, v in fixed.items()])
    if "task" not in raw or raw["task"].get("kind", "sequence") != "sequence":
        raise ConfigError(f"glue.tasks.{name}.recipe", f"{task.recipe} is not a sequence-classification recipe")
    for split in [raw["train_split"], *raw["eval_splits"].values()]:
        if not Path(split["path"]).exists():
            raise MissingFileError(f"GLUE task {name}: {split['path']} not found (is --data the GLUE folder?)")
    score = score_metric(raw)
    spec = from_dict(
        SweepSpec,
        {
            "recipe": task.recipe,
            "metrics": [score],
            "overrides": fixed,
            "grid": protocol.grid(task),
            "nproc": protocol.nproc,
        },
        f"glue.tasks.{name}",
    )
    return TaskPlan(name, task, spec, expand(spec, protocol_file, out / name), score)


def validate_runs(plan: TaskPlan) -> None:
    """Check every value the task sweeps in a full config, as ``flexbert train`` would: runs that
    between them take each value of each swept key (the keys do not interact), not all of the
    thousands a full protocol holds."""
    grid = plan.spec.grid
    covering = max(len(values) for values in grid.values())
    by_values = {tuple(run.swept[key] for key in grid): run for run in plan.runs}
    for index in range(covering):
        point = tuple(values[min(index, len(values) - 1)] for values in grid.values())
        resolve(by_values[point])


@dataclass
class Choice:
    """A task's chosen setting: the highest score averaged over seeds."""

    setting: dict[str, Any]
    mean: float
    scores: list[float]  # of its finished seeds
    best_run: str  # its run with the highest score


def choose(rows: list[dict[str, Any]], score: str) -> Choice | None:
    """The setting whose finished runs score highest on average (the first in grid order on a tie);
    None before any run has a score."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "done" and row[score] is not None:
            groups.setdefault(tuple(row[key] for key in SETTING_KEYS), []).append(row)
    if not groups:
        return None
    setting, members = max(groups.items(), key=lambda item: statistics.fmean(row[score] for row in item[1]))
    scores = [row[score] for row in members]
    best = max(members, key=lambda row: row[score])
    return Choice(dict(zip(SETTING_KEYS, setting)), statistics.fmean(scores), scores, best["run_name"])


def start_checkpoint(out: Path, source: str, choice: Choice) -> Path:
    return out / source / choice.best_run / "checkpoints" / "best.pt"


def with_start(plan: TaskPlan, protocol_file: Path, out: Path, load_path: Path) -> TaskPlan:
    """The same runs, fine-tuning ``load_path`` instead of MODEL."""
    spec = dataclasses.replace(plan.spec, overrides={**plan.spec.overrides, "load_path": str(load_path)})
    return dataclasses.replace(plan, spec=spec, runs=expand(spec, protocol_file, out / plan.name))


# --- the table ----------------------------------------------------------------------------------------


@dataclass
class TaskResult:
    name: str
    title: str
    score: str
    choice: Choice | None
    runs_done: int
    runs_total: int
    started_from: str


def _metric_label(score: str) -> str:
    split, metric = score.split("/")[1], score.split("/")[2].removeprefix("best_")
    return metric if split == "eval" else f"{split} {metric}"


def table5(results: list[TaskResult], model_name: str) -> str:
    """Table 5's layout: one row, each task's score ×100, and their average once every task has one."""
    scores = [100 * result.choice.mean if result.choice else None for result in results]
    average = f"{statistics.fmean(scores):.1f}" if scores and None not in scores else "—"
    cells = [f"{score:.1f}" if score is not None else "—" for score in scores]
    header = ["Model", *(result.title for result in results), "Avg"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        f"| {model_name} | " + " | ".join([*cells, average]) + " |",
    ]
    return "\n".join(lines) + "\n"


def details(results: list[TaskResult]) -> str:
    header = ["task", "metric", "lr", "weight decay", "epochs", "score (mean ± std over seeds)", "runs", "started from"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        choice = result.choice
        if choice is None:
            setting, shown = ["—"] * 3, "—"
        else:
            setting = [
                f"{choice.setting[key]:g}" if isinstance(choice.setting[key], float) else str(choice.setting[key])
                for key in SETTING_KEYS
            ]
            spread = f" ± {100 * statistics.stdev(choice.scores):.1f}" if len(choice.scores) > 1 else ""
            shown = f"{100 * choice.mean:.1f}{spread} (n={len(choice.scores)})"
        lines.append(
            "| "
            + " | ".join(
                [
                    result.title,
                    _metric_label(result.score),
                    *setting,
                    shown,
                    f"{result.runs_done}/{result.runs_total}",
                    result.started_from,
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: list[TaskResult], model_name: str) -> str:
    """OUT/glue.md (Table 5 and each task's choice) and OUT/glue.csv; the markdown is returned."""
    text = (
        f"# GLUE: {model_name}\n\n"
        + table5(results, model_name)
        + "\nEach score is the chosen setting's best dev-set evaluation (early stopping), ×100, averaged over its "
        "seeds; the chosen setting has the highest such average.\n\n" + details(results)
    )
    (out / "glue.md").write_text(text)
    with (out / "glue.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            ["task", "metric", *SETTING_KEYS, "score", "seeds", "best_run", "runs_done", "runs_total", "started_from"]
        )
        for result in results:
            choice = result.choice
            writer.writerow(
                [
                    result.name,
                    result.score,
                    *(choice.setting[key] if choice else "" for key in SETTING_KEYS),
                    choice.mean if choice else "",
                    len(choice.scores) if choice else 0,
                    choice.best_run if choice else "",
                    result.runs_done,
                    result.runs_total,
                    result.started_from,
                ]
            )
    return text


# --- the whole protocol ---------------------------------------------------------------------------------


def _selected(protocol: GlueProtocol, tasks: list[str] | None) -> list[str]:
    """The tasks to run, in the protocol's order: sources first, so that their dependents can start."""
    chosen = tasks or list(protocol.tasks)
    for name in chosen:
        if name not in protocol.tasks:
            raise ConfigError("--tasks", f"unknown task {name!r}; the protocol's: {', '.join(protocol.tasks)}")
        source = protocol.tasks[name].start_from
        if source is not None and source not in chosen:
            raise ConfigError(
                "--tasks",
                f"{name} starts from {source}'s best checkpoint; run {source} too (or give a --protocol "
                f"whose {name} has no start_from)",
            )
    ordered = [name for name in protocol.tasks if name in chosen]
    return sorted(ordered, key=lambda name: name not in protocol.sources)


def run_glue(
    model: str,
    data: str,
    out: str | Path | None = None,
    protocol_file: str | Path | None = None,
    tasks: list[str] | None = None,
    overrides: list[str] = (),
    nproc: int | None = None,
    dry_run: bool = False,
) -> int:
    """Plan every task's runs and validate them, then train them task by task (``dry_run``: write the
    commands of every run that can start now) and write Table 5; 0 when every run finished."""
    refuse_launcher("glue")
    protocol_file = Path(protocol_file) if protocol_file is not None else DEFAULT_PROTOCOL
    protocol = load_protocol(protocol_file)
    if nproc is not None:
        if nproc < 1:
            raise ConfigError("--nproc", f"must be at least 1, got {nproc}")
        protocol.nproc = nproc
    if not Path(data).is_dir():
        raise MissingFileError(f"GLUE folder not found: {data}")
    model_name = Path(model).name or str(model)
    out = Path(out) if out is not None else Path("runs", "glue", model_name)
    fixed = {**model_overrides(model), "vars.glue": str(data)}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(item, "overrides are written key=value (for example batch_size=16)")
        fixed[key] = _override_value(value)
    names = _selected(protocol, tasks)
    plans = {name: plan_task(protocol, protocol_file, name, fixed, out) for name in names}
    total = sum(len(plan.runs) for plan in plans.values())
    print(f"glue {model_name}: {total} runs of {len(plans)} tasks; checking every swept value", flush=True)
    for plan in plans.values():
        validate_runs(plan)

    results: dict[str, TaskResult] = {}
    choices: dict[str, Choice | None] = {}
    complete: dict[str, bool] = {}
    planned: list[Run] = []
    done_before = 0
    for name, plan in plans.items():
        source = plan.task.start_from
        started_from = str(model)
        if source is not None:
            if not complete[source] or choices[source] is None:
                why = "has runs to go" if dry_run else "has runs that failed; run glue again to retry them"
                print(f"glue: {name} waits for {source}, which {why}", flush=True)
                results[name] = TaskResult(
                    name, plan.task.title, plan.score, None, 0, len(plan.runs), f"{source} (waiting)"
                )
                complete[name] = False
                continue
            checkpoint = start_checkpoint(out, source, choices[source])
            plan = with_start(plan, protocol_file, out, checkpoint)
            started_from = f"{source}: {choices[source].best_run}"
        if dry_run:
            rows = [_row_if_done(run, plan) for run in plan.runs]
            planned += [run for run in plan.runs if not (run.folder / DONE).is_file()]
        else:
            rows = [
                execute(run, f"[{plan.name} {index}/{len(plan.runs)}] {run.name}", plan.spec.metrics)
                for index, run in enumerate(plan.runs, 1)
            ]
            (out / name).mkdir(parents=True, exist_ok=True)
            write_report(out / name, name, plan.spec, rows)
        done = sum(row["status"] == "done" for row in rows)
        done_before += done
        complete[name] = done == len(rows)
        choices[name] = choose(rows, plan.score)
        results[name] = TaskResult(name, plan.task.title, plan.score, choices[name], done, len(rows), started_from)

    ordered = [results[name] for name in protocol.tasks if name in results]
    if dry_run:
        configs = [load_yaml_config(run.recipe, run.overrides) for run in planned]
        write_plan(planned, configs, out)
        print(
            f"glue {model_name}: {len(planned)} runs to go in {out / 'commands.txt'} ({done_before} finished); "
            "run this again once they are done, to plan the tasks that wait for them",
            flush=True,
        )
        return 0
    print(write_results(out, ordered, model_name), end="", flush=True)
    print(f"glue {model_name}: {out / 'glue.md'}, {out / 'glue.csv'}", flush=True)
    return 0 if all(result.runs_done == result.runs_total for result in ordered) else 1


def _row_if_done(run: Run, plan: TaskPlan) -> dict[str, Any]:
    """A planned run's results row, as training it would have returned it if it finished earlier."""
    if not (run.folder / DONE).is_file():
        return {"run_name": run.name, "status": "planned", **run.swept, plan.score: None}
    return {"run_name": run.name, "status": "done", **run.swept, **final_metrics(run.folder, [plan.score])}


def _override_value(text: str) -> Any:
    """A command-line override's value, read as the train command reads it (YAML)."""
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
