"""Sweeps: expansion into named runs, dry-run plans, running and resuming, aggregation, bad input."""

import contextlib
import csv
import io
import random
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, STSB_COLUMNS, TOKENIZER

from flexbert.cli import main
from flexbert.train.loggers import read_metrics
from flexbert.train.sweep import DONE, Run, expand, final_metrics, load_sweep, run_sweep, summary_table
from flexbert.typed_config import ConfigError
from flexbert.yaml_config import load_yaml_config

RECIPE = ROOT / "yamls" / "finetune" / "stsb.yaml"
METRICS = ["metrics/eval/spearman", "metrics/eval/pearson"]
# A tiny model on synthetic pairs in STS-B's layout (see write_pairs), one epoch: about 10 s a run.
TINY = {
    "tokenizer": str(TOKENIZER),
    "model.hidden_size": 64,
    "model.num_hidden_layers": 2,
    "model.num_attention_heads": 4,
    "model.intermediate_size": 96,
    "model.attn_backend": "sdpa",
    "max_duration": "1ep",
    "batch_size": 32,
    "logging.progress_bar": False,
}
pytestmark = pytest.mark.xdist_group("streaming")  # the real sweep trains


def write_pairs(path: Path, count: int, seed: int) -> None:
    """Sentence pairs scored 0-5 in GLUE's STS-B layout: the score is the share of words they share."""
    rng = random.Random(seed)
    words = "the a cat dog sat ran on under mat park fast slow red blue".split()
    lines = ["\t".join(STSB_COLUMNS)]
    for index in range(count):
        first = rng.choices(words, k=6)
        second = [word if rng.random() < 0.5 else rng.choice(words) for word in first]
        score = 5 * sum(a == b for a, b in zip(first, second)) / 6
        lines.append(
            "\t".join(
                [
                    str(index),
                    "synthetic",
                    "x",
                    "2026",
                    str(index),
                    "a",
                    "b",
                    " ".join(first),
                    " ".join(second),
                    f"{score:.3f}",
                ]
            )
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module", autouse=True)
def synthetic_glue(tmp_path_factory):
    glue = tmp_path_factory.mktemp("glue")
    write_pairs(glue / "STS-B" / "train.tsv", 200, seed=0)
    write_pairs(glue / "STS-B" / "dev.tsv", 100, seed=1)
    TINY["vars.glue"] = str(glue)
    yield glue
    del TINY["vars.glue"]


def write_sweep(folder: Path, name: str = "tiny", **sections) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        yaml.safe_dump({"recipe": str(RECIPE), "overrides": TINY, "metrics": METRICS, **sections}, sort_keys=False)
    )
    return path


def quietly(*args, **kwargs) -> tuple[int, str]:
    """run_sweep's exit code and what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = run_sweep(*args, **kwargs)
    return code, printed.getvalue()


# --- expansion ------------------------------------------------------------------------------------


def test_grid_times_random_draws_with_deterministic_names(tmp_path):
    path = write_sweep(
        tmp_path,
        grid={"optimizer.lr": [1e-3, 8e-5], "seed": [1, 2]},
        random={
            "samples": 3,
            "seed": 7,
            "params": {
                "optimizer.weight_decay": {"distribution": "loguniform", "low": 1e-6, "high": 1e-3},
                "task.pooling": {"distribution": "choice", "values": ["cls", "mean"]},
            },
        },
    )
    runs = expand(load_sweep(path), path, tmp_path / "out")
    assert len(runs) == 3 * 2 * 2
    assert [run.name for run in runs] == [run.name for run in expand(load_sweep(path), path, tmp_path / "out")]
    draws = {(run.swept["optimizer.weight_decay"], run.swept["task.pooling"]) for run in runs}
    assert len(draws) == 3  # every draw is crossed with every grid point
    for decay, pooling in draws:
        assert 1e-6 <= decay <= 1e-3 and float(f"{decay:.3g}") == decay and pooling in ("cls", "mean")
    first = runs[0]
    decay, pooling = first.swept["optimizer.weight_decay"], first.swept["task.pooling"]
    assert first.name == f"stsb-lr0.001-seed1-weight_decay{decay}-pooling{pooling}"
    assert first.overrides[-4:] == [
        f"optimizer.weight_decay={decay}",
        f"task.pooling={pooling}",
        f"run_name={first.name}",
        f"run_root={tmp_path / 'out'}",
    ]
    assert load_yaml_config(first.recipe, first.overrides)["optimizer"]["weight_decay"] == decay


def test_names_of_recipe_lists_and_clashing_keys(tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(f"include: {RECIPE}\n")
    path = write_sweep(tmp_path, recipe=[str(RECIPE), str(other)], grid={"optimizer.eps": [1e-6], "model.eps": [1e-5]})
    assert [run.name for run in expand(load_sweep(path), path, tmp_path)] == [
        "stsb-optimizer_eps1e-06-model_eps1e-05",
        "other-optimizer_eps1e-06-model_eps1e-05",
    ]
    assert [run.swept["recipe"] for run in expand(load_sweep(path), path, tmp_path)] == [str(RECIPE), str(other)]


# --- dry run --------------------------------------------------------------------------------------


def test_dry_run_of_the_shipped_sweep_writes_configs_and_commands(tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["sweep", str(ROOT / "yamls" / "sweeps" / "stsb-lr-seed.yaml"), "--dry-run", "--out", str(out)]) == 0
    names = sorted(path.stem for path in (out / "configs").iterdir())
    assert len(names) == 12 and "stsb-lr8e-05-seed3" in names
    config = load_yaml_config(out / "configs" / "stsb-lr8e-05-seed3.yaml")
    assert (config["optimizer"]["lr"], config["seed"]) == (8e-5, 3)
    assert (config["run_name"], config["run_root"]) == ("stsb-lr8e-05-seed3", str(out))
    commands = (out / "commands.txt").read_text().splitlines()
    assert len(commands) == 12
    assert f"-m flexbert.cli train {RECIPE} load_path=null optimizer.lr=3e-05 seed=1 run_name=" in commands[0]
    assert commands[0].endswith(f"touch {out}/stsb-lr3e-05-seed1/{DONE}")
    assert sorted(path.name for path in out.iterdir()) == ["commands.txt", "configs"]  # nothing ran
    assert "validating 12 runs" in capsys.readouterr().out


# --- aggregation ----------------------------------------------------------------------------------


def test_summary_is_mean_and_std_over_seeds_of_finished_runs():
    rows = [
        {"status": "done", "lr": 1e-3, "seed": 1, "m": 0.4},
        {"status": "done", "lr": 1e-3, "seed": 2, "m": 0.6},
        {"status": "done", "lr": 2e-3, "seed": 1, "m": 0.7},
        {"status": "failed", "lr": 2e-3, "seed": 2, "m": None},
        {"status": "done", "lr": 3e-3, "seed": 1, "m": None},
    ]
    assert summary_table(rows, ["lr"], ["m"]) == (
        "| lr | m | n |\n|---|---|---|\n| 0.001 | 0.5 ± 0.14 | 2 |\n| 0.002 | 0.7 | 1 |\n| 0.003 | — | 1 |\n"
    )


def test_final_metrics_are_the_last_logged_values(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "m": 0.1}\n{"step": 2, "loss": 3.0}\n{"step": 3, "m": 0.3}\n{"step": 4, "loss": 2.0}\n'
    )
    assert final_metrics(tmp_path, ["m", "loss", "absent"]) == {"m": 0.3, "loss": 2.0, "absent": None}
    assert final_metrics(tmp_path / "never-ran", ["m"]) == {"m": None}


# --- running --------------------------------------------------------------------------------------

# Stands in for `flexbert train`: seed 2 dies, the others log two evaluations.
FAKE_TRAINING = """
import json, sys
from pathlib import Path
args = dict(arg.split("=", 1) for arg in sys.argv[1:])
if args["seed"] == "2":
    sys.exit("loss is NaN")
run_dir = Path(args["run_root"], args["run_name"])
run_dir.mkdir(parents=True, exist_ok=True)
rows = [{"step": 1, "metrics/eval/spearman": -1.0}, {"step": 2, "metrics/eval/spearman": int(args["seed"]) / 10}]
(run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\\n" for row in rows))
"""


def test_a_failed_run_is_recorded_the_sweep_goes_on_and_a_rerun_retries_only_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Run, "command", lambda run: [sys.executable, "-c", FAKE_TRAINING, *run.overrides])
    path, out = write_sweep(tmp_path, grid={"optimizer.lr": [1e-3, 2e-3], "seed": [1, 2, 3]}), tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "[2/6] stsb-lr0.001-seed2: FAILED in" in printed and "loss is NaN" in printed
    assert "[3/6] stsb-lr0.001-seed3: DONE in" in printed and "metrics/eval/spearman 0.3" in printed
    with (out / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["run_name"], row["status"], row["metrics/eval/spearman"]) for row in rows][:3] == [
        ("stsb-lr0.001-seed1", "done", "0.1"),
        ("stsb-lr0.001-seed2", "failed", ""),
        ("stsb-lr0.001-seed3", "done", "0.3"),
    ]
    assert (rows[0]["optimizer.lr"], rows[0]["seed"], rows[0]["metrics/eval/pearson"]) == ("0.001", "1", "")
    summary = (out / "summary.md").read_text()
    assert "mean ± std over seed" in summary and "| 0.002 | 0.2 ± 0.14 | — | 2 |" in summary
    assert not (out / "stsb-lr0.001-seed2" / DONE).exists()

    assert main(["sweep", str(path), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert printed.count("running") == 2 and printed.count("finished earlier, skipped") == 4
    assert "removed the unfinished folder" in printed


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """A real sweep, one learning rate × two seeds, whose second run an earlier attempt left half done."""
    folder = tmp_path_factory.mktemp("sweep")
    path, out = write_sweep(folder, grid={"optimizer.lr": [1e-3], "seed": [1, 2]}), folder / "out"
    (out / "stsb-lr0.001-seed2").mkdir(parents=True)
    (out / "stsb-lr0.001-seed2" / "stale.txt").write_text("killed mid-run")
    code, printed = quietly(path, out)
    return path, out, code, printed


def test_a_tiny_stsb_sweep_trains_every_run_and_summarises_them(tiny_sweep):
    _, out, code, printed = tiny_sweep
    assert code == 0, printed
    assert "[1/2] stsb-lr0.001-seed1: running" in printed and "[2/2] stsb-lr0.001-seed2: DONE in" in printed
    assert not (out / "stsb-lr0.001-seed2" / "stale.txt").exists()  # restarted from nothing
    with (out / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["run_name"], row["status"], row["seed"]) for row in rows] == [
        ("stsb-lr0.001-seed1", "done", "1"),
        ("stsb-lr0.001-seed2", "done", "2"),
    ]
    for row in rows:
        logged = [r for r in read_metrics(out / row["run_name"]) if "metrics/eval/spearman" in r][-1]
        assert float(row["metrics/eval/spearman"]) == logged["metrics/eval/spearman"]
        assert -1 <= float(row["metrics/eval/pearson"]) <= 1
    table = (out / "summary.md").read_text().splitlines()[-3:]
    assert table[0] == "| optimizer.lr | metrics/eval/spearman | metrics/eval/pearson | n |"
    assert table[2].startswith("| 0.001 | ") and table[2].count(" ± ") == 2 and table[2].endswith(" | 2 |")


def test_a_resumed_sweep_skips_finished_runs(tiny_sweep):
    path, out, code, _ = tiny_sweep
    assert code == 0
    marks = {file: file.stat().st_mtime_ns for file in out.glob("*/*") if file.name in (DONE, "metrics.jsonl")}
    results = (out / "results.csv").read_text()
    code, printed = quietly(path, out)
    assert code == 0 and "running" not in printed and printed.count("finished earlier, skipped") == 2
    assert {file: file.stat().st_mtime_ns for file in marks} == marks
    assert (out / "results.csv").read_text() == results


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "error"),
    [
        ({"gird": {"seed": [1]}}, r"sweep\.gird: unknown key; did you mean 'grid'"),
        ({"grid": {}}, "sweep.grid: nothing to sweep"),
        ({"grid": {"seed": []}}, r"sweep\.grid\.seed: no values"),
        ({"grid": {"seed": 1}}, r"sweep\.grid\.seed: expected a list"),
        ({"recipe": "missing.yaml", "grid": {"seed": [1]}}, "missing.yaml not found"),
        (
            {"grid": {"optimizer.lrr": [1e-3]}},
            r"run stsb-lrr0\.001 \(optimizer\.lrr=0\.001\): optimizer\.lrr: unknown key",
        ),
        ({"grid": {"optimizer.name": ["decoupled_adamw", "adamw_typo"]}}, "run stsb-nameadamw_typo .*optimizer.name"),
        (
            {"grid": {"seed": [1]}, "overrides": {**TINY, "seed": 3}},
            r"sweep\.grid\.seed: is also set in sweep\.overrides",
        ),
        ({"grid": {"run_name": ["mine"]}}, r"sweep\.grid\.run_name: cannot be set here"),
        ({"grid": {"seed": [1]}, "seed_keys": ["sed"]}, "'sed' is not swept"),
        (
            {"random": {"samples": 2, "params": {"optimizer.lr": {"distribution": "loguniform", "low": 0, "high": 1}}}},
            "needs low > 0",
        ),
        (
            {"random": {"samples": 2, "params": {"optimizer.lr": {"distribution": "normal", "low": 0, "high": 1}}}},
            r"distribution: must be one of \['loguniform', 'uniform', 'choice'\]",
        ),
        (
            {"random": {"samples": 3, "params": {"seed": {"distribution": "choice", "values": [1, 2]}}}},
            "two runs would be named stsb-seed",
        ),
    ],
)
def test_bad_sweeps_stop_with_one_error_before_anything_runs(tmp_path, sections, error):
    path, out = write_sweep(tmp_path, **sections), tmp_path / "out"
    with pytest.raises(ConfigError, match=error):
        run_sweep(path, out)
    assert not out.exists()


def test_the_command_line_reports_a_bad_sweep_in_one_line(tmp_path, capsys):
    assert main(["sweep", str(write_sweep(tmp_path, grid={"optimizer.lrr": [1e-3]}))]) == 2
    error = capsys.readouterr().err
    assert error.startswith("flexbert: error: run stsb-lrr0.001") and error.count("\n") == 1
