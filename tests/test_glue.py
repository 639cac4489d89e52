"""GLUE as the paper ran it: the protocol's runs, the choice per task, MNLI's best checkpoint as the
start of RTE, MRPC and STS-B, Table 5, resuming, cluster plans, bad input; on GLUE's eight TSV layouts
built here, and on the real STS-B where it is present."""

import csv
import dataclasses
import json
import random
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, STSB, STSB_COLUMNS, TOKENIZER, needs_stsb

from flexbert.cli import main
from flexbert.core.checkpoint import MODEL_CONFIG_KEY, write_weights
from flexbert.core.hf import export_hf
from flexbert.core.model import FlexBertConfig, FlexBertForMaskedLM
from flexbert.core.tokenizer import load_tokenizer
from flexbert.train.glue import Choice, choose, load_protocol
from flexbert.train.loggers import read_metrics
from flexbert.train.sweep import Run
from flexbert.typed_config import ConfigError

pytestmark = pytest.mark.xdist_group("streaming")  # the real protocol trains
FINETUNE = ROOT / "yamls" / "finetune"
TASKS = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]
WORDS = "the a cat dog sat ran on under mat park fast slow red blue good bad not very".split()


# --- GLUE's folders, in their original layouts -----------------------------------------------------------


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(3, 9)))


def _write(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([header] if header else []) + rows
    path.write_text("".join("\t".join(line) + "\n" for line in lines))


def write_glue(folder: Path, examples: int = 48) -> Path:
    """Each task's train and dev TSVs with GLUE's own columns (CoLA without a header, MNLI's parses
    and its two dev sets), random sentences and labels."""
    rng = random.Random(0)
    nli = ["contradiction", "entailment", "neutral"]
    mnli_train = [
        "index",
        "promptID",
        "pairID",
        "genre",
        *(f"sentence{i}_{k}" for k in ("binary_parse", "parse") for i in (1, 2)),
    ]
    for split in ("train", "dev"):
        pairs = [(_sentence(rng), _sentence(rng)) for _ in range(examples)]
        binary = [str(rng.randint(0, 1)) for _ in range(examples)]
        _write(folder / "CoLA" / f"{split}.tsv", None, [["gj04", b, "", a] for (a, _), b in zip(pairs, binary)])
        _write(folder / "SST-2" / f"{split}.tsv", ["sentence", "label"], [[a, b] for (a, _), b in zip(pairs, binary)])
        _write(
            folder / "MRPC" / f"{split}.tsv",
            ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
            [[b, str(i), str(i + 1), a, c] for i, ((a, c), b) in enumerate(zip(pairs, binary))],
        )
        stsb = STSB_COLUMNS
        _write(
            folder / "STS-B" / f"{split}.tsv",
            stsb,
            [
                [str(i), "main-news", "x", "2026", str(i), "s", "s", a, c, f"{rng.uniform(0, 5):.3f}"]
                for i, (a, c) in enumerate(pairs)
            ],
        )
        _write(
            folder / "QQP" / f"{split}.tsv",
            ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            [[str(i), str(2 * i), str(2 * i + 1), a, c, b] for i, ((a, c), b) in enumerate(zip(pairs, binary))],
        )
        entail = [rng.choice(["entailment", "not_entailment"]) for _ in range(examples)]
        _write(
            folder / "QNLI" / f"{split}.tsv",
            ["index", "question", "sentence", "label"],
            [[str(i), a, c, e] for i, ((a, c), e) in enumerate(zip(pairs, entail))],
        )
        _write(
            folder / "RTE" / f"{split}.tsv",
            ["index", "sentence1", "sentence2", "label"],
            [[str(i), a, c, e] for i, ((a, c), e) in enumerate(zip(pairs, entail))],
        )
    for split, labels in (
        ("train", ["label1"]),
        ("dev_matched", [f"label{i}" for i in range(1, 6)]),
        ("dev_mismatched", [f"label{i}" for i in range(1, 6)]),
    ):
        rows = []
        for i in range(examples):
            a, c, gold = _sentence(rng), _sentence(rng), rng.choice(nli)
            rows.append(
                [
                    str(i),
                    str(i),
                    f"{i}n",
                    "fiction",
                    "( x )",
                    "( y )",
                    "(ROOT x)",
                    "(ROOT y)",
                    a,
                    c,
                    *[gold] * len(labels),
                    gold,
                ]
            )
        _write(folder / "MNLI" / f"{split}.tsv", [*mnli_train, "sentence1", "sentence2", *labels, "gold_label"], rows)
    return folder


def tiny_model() -> FlexBertForMaskedLM:
    tokenizer = load_tokenizer(TOKENIZER)
    config = FlexBertConfig.from_dict(
        dict(
            vocab_size=50368,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=48,
            pad_token_id=tokenizer.pad_id,
            cls_token_id=tokenizer.cls_id,
            sep_token_id=tokenizer.sep_id,
            attn_backend="sdpa",
        )
    )
    return FlexBertForMaskedLM(config)


def tiny_checkpoint(path: Path) -> Path:
    """A pretrained-model stand-in as ``flexbert import-hf`` writes one: weights and model config."""
    model = tiny_model()
    write_weights(path, model.state_dict(), **{MODEL_CONFIG_KEY: dataclasses.asdict(model.config)})
    return path


def write_protocol(folder: Path, **changes) -> Path:
    """The shipped protocol with a tiny grid, or other changes."""
    protocol = yaml.safe_load((ROOT / "yamls" / "sweeps" / "glue-paper.yaml").read_text())
    for task in protocol["tasks"].values():
        task["recipe"] = str(FINETUNE / Path(task["recipe"]).name)
    protocol.update(changes)
    path = folder / "protocol.yaml"
    path.write_text(yaml.safe_dump(protocol, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def glue(tmp_path_factory) -> Path:
    return write_glue(tmp_path_factory.mktemp("glue"))


# --- the protocol's logic, with a stand-in for training ------------------------------------------------------

# Logs what it was asked to train, fails where told, and logs a score that rises with the learning
# rate and the seed; writes best.pt where the run keeps it.
FAKE_TRAINING = """
import json, os, sys
from pathlib import Path
from flexbert.yaml_config import load_yaml_config
raw = load_yaml_config(sys.argv[1], sys.argv[2:])
score_key = "metrics/" + next(iter(raw["eval_splits"])) + "/best_" + raw["task"]["metrics"][0]
run_dir = Path(raw["run_root"], raw["run_name"])
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({"run": raw["run_name"], "load_path": raw["load_path"]}) + "\\n")
if raw["run_name"] == os.environ.get("FAKE_FAIL"):
    sys.exit("loss is NaN")
score = raw["optimizer"]["lr"] * 1000 + raw["seed"] / 100
run_dir.mkdir(parents=True, exist_ok=True)
rows = [{"step": 1, score_key: score / 2}, {"step": 2, score_key: score}]
(run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\\n" for row in rows))
if raw["early_stopping"]["save_best"]:
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "best.pt").write_text("weights")
"""


@pytest.fixture
def fake_training(monkeypatch, tmp_path):
    log = tmp_path / "trained.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setattr(Run, "command", lambda run: [sys.executable, "-c", FAKE_TRAINING, run.recipe, *run.overrides])
    return lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def fake_score(lr: float, seed: int) -> float:
    return lr * 1000 + seed / 100


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    """MODEL as a Hugging Face directory with its tokenizer, which every run then uses."""
    folder = tmp_path_factory.mktemp("hf")
    return export_hf(tiny_model(), folder / "tiny-modernbert", TOKENIZER)


def small_grid(folder: Path) -> Path:
    return write_protocol(
        folder,
        learning_rates=[1e-5, 3e-5],
        weight_decays=[1e-6],
        seeds=[1],
        tasks={
            "sst2": {"recipe": str(FINETUNE / "sst2.yaml"), "title": "SST-2", "epochs": [1]},
            "mnli": {"recipe": str(FINETUNE / "mnli.yaml"), "title": "MNLI", "epochs": [1, 2], "seeds": [1, 2]},
            "rte": {"recipe": str(FINETUNE / "rte.yaml"), "title": "RTE", "epochs": [2], "start_from": "mnli"},
        },
    )


def test_mnli_runs_first_and_rte_starts_from_its_chosen_best_checkpoint(
    glue, hf_model, fake_training, tmp_path, capsys
):
    protocol, out = small_grid(tmp_path), tmp_path / "out"
    assert main(["glue", str(hf_model), "--data", str(glue), "--out", str(out), "--protocol", str(protocol)]) == 0
    printed = capsys.readouterr().out
    trained = fake_training()
    order = [entry["run"].split("-")[0] for entry in trained]
    assert order == ["mnli"] * 8 + ["sst2"] * 2 + ["rte"] * 2  # the source first: 2 lr × 2 epochs × 2 seeds
    # MNLI's choice: the highest lr (ties over epochs go to the first), its best seed's checkpoint.
    mnli_best = "mnli-lr3e-05-weight_decay1e-06-max_duration1ep-seed2"
    start = out / "mnli" / mnli_best / "checkpoints" / "best.pt"
    assert {entry["load_path"] for entry in trained if entry["run"].startswith("rte")} == {str(start)}
    assert {entry["load_path"] for entry in trained if not entry["run"].startswith("rte")} == {str(hf_model)}
    # Only the source keeps best checkpoints.
    assert start.is_file() and not list((out / "sst2").glob("*/checkpoints/best.pt"))
    table = (out / "glue.md").read_text()
    mnli = statistics.fmean([fake_score(3e-5, 1), fake_score(3e-5, 2)])
    sst2, rte = fake_score(3e-5, 1), fake_score(3e-5, 1)
    average = statistics.fmean([sst2, mnli, rte])
    assert "| Model | SST-2 | MNLI | RTE | Avg |" in table
    assert f"| tiny-modernbert | {100 * sst2:.1f} | {100 * mnli:.1f} | {100 * rte:.1f} | {100 * average:.1f} |" in table
    assert f"| MNLI | matched accuracy | 3e-05 | 1e-06 | 1ep | {100 * mnli:.1f} ± " in table
    assert f"| RTE | accuracy | 3e-05 | 1e-06 | 2ep | {100 * rte:.1f} (n=1) | 2/2 | mnli: {mnli_best} |" in table
    assert table in printed
    with (out / "glue.csv").open() as file:
        rows = {row["task"]: row for row in csv.DictReader(file)}
    assert rows["mnli"]["best_run"] == mnli_best and float(rows["mnli"]["score"]) == pytest.approx(mnli)
    assert rows["mnli"]["score"] and rows["mnli"]["metric"] == "metrics/matched/best_accuracy"
    with (out / "mnli" / "results.csv").open() as file:
        assert len(list(csv.DictReader(file))) == 8

    # Run again: nothing trains, the same table.
    assert main(["glue", str(hf_model), "--data", str(glue), "--out", str(out), "--protocol", str(protocol)]) == 0
    assert len(fake_training()) == len(trained) and (out / "glue.md").read_text() == table


def test_a_failed_source_run_holds_its_dependents_until_a_rerun_retries_it(
    glue, hf_model, fake_training, tmp_path, capsys, monkeypatch
):
    protocol, out = small_grid(tmp_path), tmp_path / "out"
    args = ["glue", str(hf_model), "--data", str(glue), "--out", str(out), "--protocol", str(protocol)]
    monkeypatch.setenv("FAKE_FAIL", "mnli-lr1e-05-weight_decay1e-06-max_duration2ep-seed1")
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert "glue: rte waits for mnli, which has runs that failed; run glue again to retry them" in printed
    assert not any(entry["run"].startswith("rte") for entry in fake_training())
    assert "| tiny-modernbert | " in printed and printed.count("—") >= 2  # no RTE score, no average
    monkeypatch.delenv("FAKE_FAIL")
    before = len(fake_training())
    assert main(args) == 0
    retried = [entry["run"] for entry in fake_training()[before:]]
    assert retried == [
        "mnli-lr1e-05-weight_decay1e-06-max_duration2ep-seed1",
        *(f"rte-lr{lr}-weight_decay1e-06-max_duration2ep-seed1" for lr in ("1e-05", "3e-05")),
    ]


def test_a_dry_run_plans_what_can_start_and_plans_the_dependents_once_their_source_finished(
    glue, hf_model, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "trained.jsonl"))
    protocol, out = small_grid(tmp_path), tmp_path / "out"
    args = ["glue", str(hf_model), "batch_size=8", "--data", str(glue), "--out", str(out), "--protocol", str(protocol)]
    args.append("--dry-run")
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "rte waits for mnli, which has runs to go" in printed and "10 runs to go" in printed
    lines = (out / "commands.txt").read_text().splitlines()
    assert len(lines) == 10 and not any("rte" in line for line in lines) and not (out / "mnli").exists()
    config = yaml.safe_load((out / "configs" / "mnli-lr1e-05-weight_decay1e-06-max_duration1ep-seed1.yaml").read_text())
    assert config["batch_size"] == 8 and config["load_path"] == str(hf_model) and config["early_stopping"]["save_best"]
    assert config["eval_interval"] == "0.25ep"  # several evaluations an epoch, so that patience can act
    assert config["vars"]["glue"] == str(glue) and config["model"]["hidden_size"] == 32
    # The cluster runs the lines (here: the MNLI ones, training faked), each marking its run done.
    for line in lines:
        if "mnli-" in line:
            words = shlex.split(line)
            assert words[:4] == ["cd", str(Path.cwd()), "&&", sys.executable] and words[-3:-1] == ["&&", "touch"]
            train = words.index("train")
            subprocess.run([sys.executable, "-c", FAKE_TRAINING, *words[train + 1 : -3]], check=True)
            Path(words[-1]).touch()
    assert main(args) == 0
    lines = (out / "commands.txt").read_text().splitlines()
    assert len(lines) == 4 and sum("rte-" in line for line in lines) == 2
    start = out / "mnli" / "mnli-lr3e-05-weight_decay1e-06-max_duration1ep-seed2" / "checkpoints" / "best.pt"
    assert all(f"load_path={start}" in line for line in lines if "rte-" in line)


def test_the_choice_averages_seeds_and_breaks_ties_in_grid_order():
    def row(lr, seed, score, status="done"):
        return {
            "run_name": f"lr{lr}-seed{seed}",
            "status": status,
            "optimizer.lr": lr,
            "optimizer.weight_decay": 0.0,
            "max_duration": "1ep",
            "seed": seed,
            "s": score,
        }

    rows = [
        row(1, 1, 0.9),
        row(1, 2, 0.1),
        row(2, 1, 0.6),
        row(2, 2, 0.5),
        row(3, 1, 0.55),
        row(3, 2, 0.55),
        row(4, 1, 0.99, "failed"),
    ]
    choice = choose(rows, "s")
    assert choice == Choice(
        {"optimizer.lr": 2, "optimizer.weight_decay": 0.0, "max_duration": "1ep"}, 0.55, [0.6, 0.5], "lr2-seed1"
    )
    assert choose([row(1, 1, None), row(2, 1, 0.3, "failed")], "s") is None


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            {
                "tasks": {
                    "rte": {"recipe": "../finetune/rte.yaml", "title": "RTE", "epochs": [2], "start_from": "mnlii"}
                }
            },
            r"tasks\.rte\.start_from: 'mnlii' is not another task",
        ),
        ({"learning_rates": []}, r"glue\.learning_rates: no values"),
        ({"seeds": 1}, r"glue\.seeds: expected a list"),
        ({"patiense": 2}, r"glue\.patiense: unknown key; did you mean 'patience'"),
        (
            {"tasks": {"cola": {"recipe": "../finetune/cola.yaml", "title": "CoLA", "epochs": [0]}}},
            r"tasks\.cola\.epochs: must all be at least 1",
        ),
    ],
)
def test_bad_protocols_stop_in_one_line_before_anything_runs(tmp_path, change, error):
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load((ROOT / "yamls/sweeps/glue-paper.yaml").read_text()), **change}))
    with pytest.raises(ConfigError, match=error):
        load_protocol(path)


def test_bad_models_data_and_task_lists_stop_in_one_line(glue, hf_model, tmp_path, capsys, monkeypatch):
    protocol = str(write_protocol(tmp_path))
    base = ["--protocol", protocol, "--out", str(tmp_path / "out")]
    cases = [
        (["glue", str(tmp_path / "nope.pt"), "--data", str(glue), *base], f"model not found: {tmp_path / 'nope.pt'}"),
        (["glue", str(hf_model), "--data", str(tmp_path / "no-glue"), *base], "GLUE folder not found"),
        (
            ["glue", str(hf_model), "--data", str(tmp_path), *base, "--tasks", "cola"],
            "GLUE task cola: " + str(tmp_path / "CoLA" / "train.tsv") + " not found",
        ),
        (
            ["glue", str(hf_model), "--data", str(glue), *base, "--tasks", "rte"],
            "--tasks: rte starts from mnli's best checkpoint; run mnli too (or give a --protocol whose rte",
        ),
        (["glue", str(hf_model), "--data", str(glue), *base, "--tasks", "wnli"], "--tasks: unknown task 'wnli'"),
        (
            ["glue", str(hf_model), "optimizer.lrr=1", "--data", str(glue), *base, "--tasks", "cola"],
            r"optimizer.lrr: unknown key",
        ),
    ]
    for args, error in cases:
        assert main(args) == 2, args
        printed = capsys.readouterr().err
        assert printed.startswith("flexbert: error: ") and error in printed and printed.count("\n") == 1, printed
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["glue", str(hf_model), "--data", str(glue), *base]) == 2
    assert "instead of a launcher" in capsys.readouterr().err


# --- the real thing, tiny -------------------------------------------------------------------------------

TINY_RUNS = {"batch_size": 16, "max_seq_len": 64, "logging.progress_bar": False, "tokenizer": str(TOKENIZER)}


def test_all_eight_tasks_train_from_their_tsvs_and_fill_table5(glue, tmp_path, capsys):
    model = tiny_checkpoint(tmp_path / "tiny.pt")
    protocol = write_protocol(tmp_path, learning_rates=[1e-3], weight_decays=[1e-6], seeds=[1], patience=1)
    text = yaml.safe_load(protocol.read_text())
    for task in text["tasks"].values():
        task.update(epochs=[1], seeds=[1])
    protocol.write_text(yaml.safe_dump(text, sort_keys=False))
    out = tmp_path / "out"
    overrides = [f"{key}={value}" for key, value in TINY_RUNS.items()]
    assert (
        main(["glue", str(model), "--data", str(glue), "--out", str(out), "--protocol", str(protocol), *overrides]) == 0
    )
    printed = capsys.readouterr().out
    table = (out / "glue.md").read_text()
    assert "| Model | CoLA | SST-2 | MRPC | STS-B | QQP | MNLI | QNLI | RTE | Avg |" in table
    scores = []
    for task in TASKS:
        (run_dir,) = (out / task).glob(f"{task}-*")
        config = json.loads((run_dir / "config.json").read_text())
        score_key = f"metrics/{next(iter(config['eval_splits']))}/best_{config['task']['metrics'][0]}"
        logged = [row[score_key] for row in read_metrics(run_dir) if score_key in row]
        assert logged, (task, score_key)
        scores.append(logged[-1])
        if task in ("rte", "mrpc", "stsb"):
            assert config["load_path"] == str(next((out / "mnli").glob("mnli-*")) / "checkpoints" / "best.pt")
        else:
            assert config["load_path"] == str(model)
    row = f"| tiny.pt | {' | '.join(f'{100 * s:.1f}' for s in scores)} | {100 * statistics.fmean(scores):.1f} |"
    assert row in table and row in printed


@needs_stsb
def test_the_real_stsb_reports_its_pearson(tmp_path, capsys):
    model = tiny_checkpoint(tmp_path / "tiny.pt")
    protocol = write_protocol(
        tmp_path,
        learning_rates=[1e-3],
        weight_decays=[1e-6],
        seeds=[1],
        tasks={"stsb": {"recipe": str(FINETUNE / "stsb.yaml"), "title": "STS-B", "epochs": [1]}},
        overrides={"train_split.limit": 256, "eval_splits.eval.limit": 128},
    )
    out = tmp_path / "out"
    overrides = [f"{key}={value}" for key, value in TINY_RUNS.items()]
    assert (
        main(
            ["glue", str(model), "--data", str(STSB.parent), "--out", str(out), "--protocol", str(protocol), *overrides]
        )
        == 0
    )
    (run_dir,) = (out / "stsb").glob("stsb-*")
    best = [row["metrics/eval/best_pearson"] for row in read_metrics(run_dir) if "metrics/eval/best_pearson" in row][-1]
    assert f"| tiny.pt | {100 * best:.1f} | {100 * best:.1f} |" in (out / "glue.md").read_text()
    assert "| STS-B | pearson | 0.001 | 1e-06 | 1ep |" in capsys.readouterr().out
