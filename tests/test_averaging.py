"""Checkpoint averaging (`flexbert average`): the mean of the weights, picked by eval loss from a run,
and a result that loads, trains further and exports."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from train_helpers import TOKENIZER, tiny_recipe, write_corpus, write_recipe

from flexbert.cli import main as cli_main
from flexbert.core.checkpoint import read_weights, write_weights
from flexbert.core.model import FlexBertForMaskedLM
from flexbert.train.loggers import read_metrics
from flexbert.train.pretrain import TrainConfig

pytestmark = [pytest.mark.xdist_group("streaming")]  # trains; see test_remote_streaming.py
EVAL_LOSS = "metrics/eval/LanguageCrossEntropy"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny run that saves and evaluates every 2 batches, keeping every checkpoint."""
    root = tmp_path_factory.mktemp("averaging")
    corpus = write_corpus(root / "corpus")
    eval_loader = {
        "tokenizer": str(TOKENIZER),
        "max_seq_len": 64,
        "rows_per_batch": 2,
        "shuffle": False,
        "epochs": 1,
        "epoch_size": 8,
        "streams": {"web": {"local": str(corpus / "web")}},
    }
    recipe = tiny_recipe(
        corpus,
        root / "runs",
        max_duration="8ba",
        save_interval="2ba",
        eval_interval="2ba",
        save_num_checkpoints_to_keep=4,
        eval_loader=eval_loader,
    )
    assert cli_main(["train", str(write_recipe(root / "recipe.yaml", recipe))]) == 0
    return root / "runs" / "tiny"


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return read_weights(path)[0]


def average(tmp_path: Path, *arguments: str) -> Path:
    out = tmp_path / "averaged.pt"
    assert cli_main(["average", "--out", str(out), *arguments]) == 0
    return out


def test_averaging_identical_checkpoints_gives_the_same_weights_back(run, tmp_path):
    checkpoint = run / "checkpoints" / "ep0-ba4-rank0.pt"
    averaged = weights_of(average(tmp_path, str(checkpoint), str(checkpoint), str(checkpoint)))
    original = weights_of(checkpoint)
    assert averaged.keys() == original.keys()
    assert all(torch.equal(averaged[name], original[name]) for name in original)


def test_two_checkpoints_average_to_their_arithmetic_mean(run, tmp_path):
    first, second = (run / "checkpoints" / f"ep0-ba{step}-rank0.pt" for step in (2, 8))
    averaged = weights_of(average(tmp_path, str(first), str(second)))
    a, b = weights_of(first), weights_of(second)
    assert any(not torch.equal(a[name], b[name]) for name in a)  # training moved them apart
    for name in a:
        torch.testing.assert_close(averaged[name], (a[name].double() + b[name].double()).div(2).float())


def test_the_best_by_eval_loss_and_the_last_are_picked_from_a_run(run, tmp_path, capsys):
    losses = {row["step"]: row[EVAL_LOSS] for row in read_metrics(run) if EVAL_LOSS in row}
    assert sorted(losses) == [2, 4, 6, 8]
    best_two = sorted(losses, key=losses.get)[:2]
    out = average(tmp_path, "--run", str(run), "--best", "2", "--last")
    expected = sorted({*best_two, 8})
    assert capsys.readouterr().out.splitlines()[0] == (
        f"{out}: the mean of "
        + ", ".join(
            str(run / "checkpoints" / f"ep0-ba{step}-rank0.pt")
            for step in [*best_two, *([8] if 8 not in best_two else [])]
        )
    )
    parts = [weights_of(run / "checkpoints" / f"ep0-ba{step}-rank0.pt") for step in expected]
    averaged = weights_of(out)
    for name in averaged:
        mean = sum(part[name].double() for part in parts) / len(parts)
        torch.testing.assert_close(averaged[name], mean.float())


def test_best_passes_over_and_names_a_checkpoint_saved_without_an_evaluation(run, tmp_path, capsys):
    """A save on SIGTERM has no eval loss at its step: --best leaves it out and says so, --last keeps it."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    sigterm = copy / "checkpoints" / "ep0-ba9-rank0.pt"
    shutil.copy(copy / "checkpoints" / "ep0-ba4-rank0.pt", sigterm)
    losses = {row["step"]: row[EVAL_LOSS] for row in read_metrics(copy) if EVAL_LOSS in row}
    out = average(tmp_path, "--run", str(copy), "--best", "2", "--last")
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "flexbert: note: --best passed over ep0-ba9-rank0.pt: no eval loss was logged at its step "
        "(a save on SIGTERM, or one between evaluations)"
    ]
    best_two = sorted(losses, key=losses.get)[:2]
    picked = [copy / "checkpoints" / f"ep0-ba{step}-rank0.pt" for step in best_two] + [sigterm]
    assert captured.out.splitlines()[0] == f"{out}: the mean of " + ", ".join(map(str, picked))


def test_best_without_any_evaluation_stops_with_one_line(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    without_eval = [{key: value for key, value in row.items() if key != EVAL_LOSS} for row in rows]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in without_eval))
    assert cli_main(["average", "--out", str(tmp_path / "never.pt"), "--run", str(copy), "--best", "1"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("flexbert: error: no eval loss was logged at the step of any checkpoint in ")
    assert line.endswith(
        "--best needs an evaluation at every save: an eval_loader, and eval_interval equal to save_interval"
    )
    assert not (tmp_path / "never.pt").exists()


def test_the_average_trains_further_and_exports(run, tmp_path):
    out = average(tmp_path, "--run", str(run), "--best", "3", "--last")
    # Export needs nothing but the averaged file: it carries its model config.
    assert cli_main(["export-hf", str(out), str(tmp_path / "hf"), "--tokenizer", str(TOKENIZER)]) == 0
    hf_model = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    averaged = weights_of(out)
    torch.testing.assert_close(
        hf_model.model.embeddings.tok_embeddings.weight, averaged["model.embeddings.tok_embeddings.weight"]
    )
    # And a next phase starts from it.
    config = json.loads((run / "config.json").read_text())
    recipe = {
        **config,
        "run_name": "after-average",
        "run_root": str(tmp_path / "runs"),
        "load_path": str(out),
        "load_weights_only": True,
        "max_duration": "2ba",
        "eval_loader": None,
    }
    recipe["train_loader"] = {k: v for k, v in recipe["train_loader"].items() if k not in ("shuffle_seed", "masking")}
    assert cli_main(["train", str(write_recipe(tmp_path / "next.yaml", recipe))]) == 0
    assert [row["step"] for row in read_metrics(tmp_path / "runs" / "after-average") if "loss/train/total" in row]


def test_checkpoints_of_different_architectures_stop_with_one_line(run, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    wider = FlexBertForMaskedLM(
        TrainConfig.from_dict(tiny_recipe(corpus, tmp_path, **{"model.hidden_size": 64})).model_config
    )
    other = tmp_path / "wider.pt"
    write_weights(other, wider.state_dict())
    mine = run / "checkpoints" / "ep0-ba2-rank0.pt"
    out = tmp_path / "never.pt"
    assert cli_main(["average", "--out", str(out), str(mine), str(other)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(
        f"flexbert: error: {other} and {mine} hold different architectures: "
        "model.embeddings.tok_embeddings.weight is (50368, 64) in one and (50368, 32) in the other"
    )
    assert not out.exists()
    for arguments, message in [
        ([], "name the checkpoints to average, or a run folder with --run"),
        (["--run", str(run)], "--run picks checkpoints by --best K and/or --last"),
    ]:
        assert cli_main(["average", "--out", str(out), *arguments]) == 2
        assert message in capsys.readouterr().err
