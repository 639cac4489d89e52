"""Reliability: exact resumption after SIGKILL, damaged checkpoints, and the NaN guard."""

import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from composer.core import Callback
from train_helpers import command, environment, run_recipe, tiny_recipe, write_corpus, write_recipe

from flexbert.cli import main as cli_main
from flexbert.core.checkpoint import LATEST_LINK
from flexbert.train.data_order import encode_record, pack_pieces, read_data_order, recorded_steps, trained_pieces
from flexbert.train.loggers import read_metrics
from flexbert.train.pretrain import TrainConfig
from flexbert.train.resume import choose_resume_checkpoint
from flexbert.typed_config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.xdist_group("streaming")  # see test_remote_streaming.py
]
STEPS = 12
# Checkpoints at steps 3, 6, 9 and 12; every run records the pieces of each step's batch, as runs do
# by default. (A given peak spares every process measuring the CPU's.)
RESUMABLE = {"max_duration": f"{STEPS}ba", "save_interval": "3ba", "autoresume": True, "logging.peak_tflops": 1.0}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def as_written(recipe: dict) -> dict:
    """The recipe as a run of its YAML file sees it (write_recipe sorts keys, so the streams come in the
    order code, web), so that in-process runs and subprocess ones train on the same batches."""
    return yaml.safe_load(yaml.safe_dump(recipe))


def build(recipe: dict):
    from flexbert.train.pretrain import build_trainer

    recipe = as_written(recipe)
    return build_trainer(TrainConfig.from_dict(recipe), recipe)


def train(recipe: dict):
    trainer = build(recipe)
    trainer.fit()
    trainer.close()
    return trainer


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    run_root = tmp_path_factory.mktemp("uninterrupted")
    train(tiny_recipe(corpus, run_root, **RESUMABLE))
    return run_root / "tiny"


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / LATEST_LINK, map_location="cpu", weights_only=False)["state"]["model"]


def losses(run_dir: Path) -> list[float]:
    return [row["loss/train/total"] for row in read_metrics(run_dir) if "loss/train/total" in row]


def assert_same_training(run_dir: Path, reference: Path) -> None:
    """Same loss at every step, same final weights, and the very same pieces at every step of every rank."""
    curve, expected = losses(run_dir), losses(reference)
    assert len(curve) == len(expected) == STEPS
    assert max(abs(a - b) for a, b in zip(curve, expected)) <= 1e-6, (curve, expected)
    weights, expected_weights = final_weights(run_dir), final_weights(reference)
    assert weights.keys() == expected_weights.keys()
    assert max((weights[k] - expected_weights[k]).abs().max().item() for k in weights) <= 1e-6
    assert read_data_order(run_dir) == read_data_order(reference)
    pieces = trained_pieces(run_dir)
    assert pieces == trained_pieces(reference)
    assert max(pieces.values()) == 1  # one epoch is far from over: nothing seen twice


def sigkill_mid_step(recipe: Path, step: int, markers: Path, nproc: int = 1) -> None:
    """Run the recipe until every rank is inside ``step`` (backward done, optimizer step not), then
    SIGKILL the whole process group, as a scheduler or a dying node would."""
    env = environment(nproc, FLEXBERT_TEST_PAUSE_AT_STEP=str(step), FLEXBERT_TEST_PAUSE_MARKERS=str(markers))
    log = markers.with_suffix(".log")
    with log.open("w") as stderr:
        process = subprocess.Popen(
            command(recipe, ROOT / "tests" / "pause_at_step.py", nproc),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while len(list(markers.glob("rank*"))) < nproc:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the step"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)


# --- SIGKILL, then autoresume --------------------------------------------------------------------------


def test_sigkill_mid_epoch_then_autoresume_trains_exactly_as_an_uninterrupted_run(corpus, uninterrupted, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(corpus, tmp_path, **RESUMABLE))
    run_dir = tmp_path / "tiny"
    sigkill_mid_step(recipe, 7, tmp_path / "paused")
    # Killed inside step 7: the latest checkpoint, ba6, holds steps 0-5; step 6 was trained and logged after it.
    assert os.readlink(run_dir / "checkpoints" / LATEST_LINK) == "ep0-ba6-rank0.pt"
    assert recorded_steps(run_dir)[0] == list(range(7))
    # As if the kill had come while step 7's record was being written: its first bytes are there.
    with (run_dir / "data_order" / "rank0.bin").open("ab") as record:
        record.write(encode_record(7, 1, pack_pieces(np.ones((5, 4), dtype=np.int64)))[:50])

    run_recipe(recipe)  # the same command, resuming
    # The torn record is gone; step 6 is recorded twice, and counts once.
    assert recorded_steps(run_dir)[0] == list(range(7)) + list(range(6, STEPS))
    assert_same_training(run_dir, uninterrupted)


def test_two_processes_resume_exactly_after_sigkill_and_agree_on_a_damaged_checkpoint(corpus, tmp_path):
    recipe = tiny_recipe(corpus, tmp_path / "killed", global_batch_rows=8, **RESUMABLE)
    killed = write_recipe(tmp_path / "killed.yaml", recipe)
    reference = write_recipe(tmp_path / "reference.yaml", {**recipe, "run_root": str(tmp_path / "reference")})
    run_recipe(reference, nproc=2)
    sigkill_mid_step(killed, 7, tmp_path / "paused", nproc=2)
    checkpoints = tmp_path / "killed" / "tiny" / "checkpoints"
    # Damage the latest checkpoint in its middle, where only a CRC check notices: both ranks must
    # still resume from the same, earlier one.
    damaged = bytearray((checkpoints / "ep0-ba6-rank0.pt").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (checkpoints / "ep0-ba6-rank0.pt").write_bytes(damaged)

    output = run_recipe(killed, nproc=2)
    assert f"checkpoint {checkpoints / 'ep0-ba6-rank0.pt'} is damaged" in output
    assert "resuming from ep0-ba3-rank0.pt" in output
    for rank in (0, 1):
        assert recorded_steps(tmp_path / "killed" / "tiny")[rank][7:9] == [3, 4]
    assert_same_training(tmp_path / "killed" / "tiny", tmp_path / "reference" / "tiny")


# --- damaged checkpoints -------------------------------------------------------------------------------


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(corpus, uninterrupted, tmp_path):
    train(tiny_recipe(corpus, tmp_path, **{**RESUMABLE, "max_duration": "6ba"}))
    latest = tmp_path / "tiny" / "checkpoints" / "ep0-ba6-rank0.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])

    with pytest.warns(
        UserWarning,
        match=rf"checkpoint {re.escape(str(latest))} is not a complete checkpoint .* "
        r"resuming from ep0-ba3-rank0\.pt",
    ):
        trainer = build(tiny_recipe(corpus, tmp_path, **RESUMABLE))
    assert int(trainer.state.timestamp.batch) == 3
    trainer.fit()
    trainer.close()
    assert (latest.parent / "ep0-ba6-rank0.pt.corrupt").stat().st_size < latest.stat().st_size
    assert_same_training(tmp_path / "tiny", uninterrupted)


def _checkpoint(path: Path, step: int) -> Path:
    torch.save({"state": {"step": step}}, path)
    return path


def test_choosing_the_checkpoint_to_resume_from(tmp_path):
    old, middle, new = (_checkpoint(tmp_path / f"ep0-ba{step}-rank0.pt", step) for step in (3, 6, 9))
    new.write_bytes(new.read_bytes()[:100])
    middle.write_bytes(b"")
    (tmp_path / LATEST_LINK).symlink_to(new.name)
    with pytest.warns(UserWarning) as caught:
        assert choose_resume_checkpoint(tmp_path) == old
    assert [str(w.message).split(" is ")[0] for w in caught] == [f"autoresume: checkpoint {p}" for p in (new, middle)]
    assert os.readlink(tmp_path / LATEST_LINK) == old.name
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ep0-ba3-rank0.pt",
        "ep0-ba6-rank0.pt.corrupt",
        "ep0-ba9-rank0.pt.corrupt",
        LATEST_LINK,
    ]

    # A run killed after writing a checkpoint but before moving the link to it.
    newer = _checkpoint(tmp_path / "ep0-ba12-rank0.pt", 12)
    with pytest.warns(UserWarning, match="the newer .*ep0-ba12-rank0.pt is intact"):
        assert choose_resume_checkpoint(tmp_path) == newer
    assert os.readlink(tmp_path / LATEST_LINK) == newer.name

    # Nothing intact left: the run stops naming the folder and every file it tried, and moves
    # nothing, so that running it again cannot silently start over either.
    for path in (old, newer):
        path.write_bytes(b"\0" * 64)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(
        ConfigError,
        match=rf"autoresume: no intact checkpoint to resume from in {tmp_path}: "
        r"ep0-ba12-rank0\.pt is not a complete checkpoint .*; ep0-ba3-rank0\.pt is "
        r"not a complete checkpoint .*Repair or move them away",
    ):
        choose_resume_checkpoint(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_an_empty_or_absent_checkpoint_folder_starts_fresh(tmp_path):
    assert choose_resume_checkpoint(tmp_path / "absent") is None
    assert choose_resume_checkpoint(tmp_path) is None
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert choose_resume_checkpoint(tmp_path) is None


def test_a_run_whose_checkpoints_are_all_damaged_stops_in_one_line(corpus, tmp_path, capsys):
    checkpoints = tmp_path / "tiny" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step in (3, 6):
        (checkpoints / f"ep0-ba{step}-rank0.pt").write_bytes(b"PK\x03\x04 cut short")
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(corpus, tmp_path, **RESUMABLE))
    assert cli_main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"flexbert: error: autoresume: no intact checkpoint to resume from in {checkpoints}: ep0-ba6-rank0.pt is"
    )
    assert "ep0-ba3-rank0.pt is" in err[0]
    assert not (tmp_path / "tiny" / "metrics.jsonl").exists()


# --- the NaN guard -------------------------------------------------------------------------------------


class Poison(Callback):
    """Makes step ``step``'s loss NaN, or one gradient infinite, as a diverging run would."""

    def __init__(self, step: int, target: str):
        self.step = step
        self.target = target
        self.weights: dict[str, dict] = {}

    def after_loss(self, state, logger) -> None:
        if state.timestamp.batch.value == self.step and self.target == "loss":
            state.loss = state.loss * math.nan

    def after_backward(self, state, logger) -> None:
        if state.timestamp.batch.value == self.step and self.target == "gradient":
            next(state.model.parameters()).grad[0, 0] = math.inf

    def batch_start(self, state, logger) -> None:
        self.weights[f"before {state.timestamp.batch.value}"] = self._snapshot(state)

    def batch_end(self, state, logger) -> None:
        self.weights[f"after {state.timestamp.batch.value - 1}"] = self._snapshot(state)

    @staticmethod
    def _snapshot(state) -> dict:
        optimizer = state.optimizers[0]
        return {
            "model": {k: v.clone() for k, v in state.model.state_dict().items()},
            "optimizer": [{k: v.clone() for k, v in optimizer.state[p].items()} for p in state.model.parameters()],
        }


def poisoned_run(corpus, run_root: Path, step: int, target: str, **overrides):
    """The trainer with ``Poison`` running before the guard, so the guard sees what it did."""
    trainer = build(tiny_recipe(corpus, run_root, **overrides))
    poison = Poison(step, target)
    trainer.state.callbacks.insert(0, poison)
    return trainer, poison


def expected_samples(uninterrupted: Path, step: int) -> list[str]:
    pieces = read_data_order(uninterrupted)[0][step]["pieces"]
    names = list(json.loads((uninterrupted / "config.json").read_text())["train_loader"]["streams"])
    return [f"{sample} ({names[stream]})" for stream, sample, _, _ in pieces]


def test_nan_loss_stops_the_run_naming_the_step_and_its_samples(corpus, uninterrupted, tmp_path, monkeypatch, capsys):
    import flexbert.train.pretrain

    build_trainer = flexbert.train.pretrain.build_trainer

    def build_poisoned(config, resolved):
        trainer = build_trainer(config, resolved)
        trainer.state.callbacks.insert(0, Poison(4, "loss"))
        return trainer

    monkeypatch.setattr(flexbert.train.pretrain, "build_trainer", build_poisoned)
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(corpus, tmp_path, **RESUMABLE))
    assert cli_main(["train", str(recipe)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # A NaN loss makes the gradient NaN too.
    assert err.startswith("flexbert: error: nan_guard: step 4 has a NaN or infinite loss and gradient; its batch held ")
    assert all(sample in err for sample in expected_samples(uninterrupted, 4)), err
    assert "stopped before the optimizer step" in err
    record = json.loads((tmp_path / "tiny" / "nan_guard.jsonl").read_text())
    assert record["pieces_per_rank"] == [read_data_order(uninterrupted)[0][4]["pieces"]]
    assert [row["step"] for row in read_metrics(tmp_path / "tiny") if "loss/train/total" in row] == [0, 1, 2, 3]


@pytest.mark.parametrize("target, problem", [("loss", "loss and gradient"), ("gradient", "gradient")])
def test_skip_leaves_the_weights_and_optimizer_untouched_and_trains_on(
    corpus, uninterrupted, tmp_path, target, problem
):
    trainer, poison = poisoned_run(corpus, tmp_path, 2, target, **{"nan_guard.action": "skip"})
    with pytest.warns(
        RuntimeWarning,
        match=rf"nan_guard: step 2 has a NaN or infinite {problem}; .* skipped its "
        "optimizer step",
    ) as caught:
        trainer.fit()
    trainer.close()
    message = str(next(w.message for w in caught if "nan_guard" in str(w.message)))
    assert all(sample in message for sample in expected_samples(uninterrupted, 2)), message

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and all(
            torch.equal(x[k], y[k]) for x, y in zip(a["optimizer"], b["optimizer"]) for k in x
        )

    weights = poison.weights
    assert same(weights["before 2"], weights["after 2"])
    assert not same(weights["before 3"], weights["after 3"])  # an ordinary step does change them
    rows = read_metrics(tmp_path / "tiny")
    assert [row["step"] for row in rows if "loss/train/total" in row] == list(range(6))
    assert [row["nan_guard/skipped_steps"] for row in rows if "nan_guard/skipped_steps" in row] == [1]
    assert all(math.isfinite(p.float().abs().max()) for p in final_weights(tmp_path / "tiny").values())


def test_reliability_sections_are_typed_and_strict(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"nan_guard.action: must be one of \['stop', 'skip'\], got 'ignore'"):
        TrainConfig.from_dict(tiny_recipe(corpus, tmp_path, **{"nan_guard.action": "ignore"}))
    with pytest.raises(ConfigError, match="data_order.recrd: unknown key; did you mean 'record'"):
        TrainConfig.from_dict(tiny_recipe(corpus, tmp_path, **{"data_order.recrd": True}))
    with pytest.raises(ConfigError, match="data_order.record: expected a boolean"):
        TrainConfig.from_dict(tiny_recipe(corpus, tmp_path, **{"data_order.record": "yes"}))
    # The switch of earlier versions says what replaced it.
    with pytest.raises(ConfigError, match=r"^debug: retired: its one key, log_sample_ids, became data_order.record"):
        TrainConfig.from_dict(tiny_recipe(corpus, tmp_path, **{"debug.log_sample_ids": True}))
