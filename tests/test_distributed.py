"""Every training feature under two processes, as ``composer -n 2`` launches them (gloo, CPU).

Pretraining with evaluation, HF export, batch-size warmup and an epoch boundary; SIGTERM; the NaN
guard with one rank diverging; fine-tuning with rank-sharded data; and a sweep whose runs are
launched on two processes.
"""

import csv
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, TOKENIZER
from train_helpers import command, environment, run_recipe, tiny_recipe, write_corpus, write_recipe

from flexbert.core.checkpoint import LATEST_LINK
from flexbert.train.data_order import read_data_order, trained_pieces
from flexbert.train.loggers import read_metrics
from flexbert.train.step import BatchSizeSchedule, BatchWarmupConfig
from flexbert.train.sweep import run_sweep
from flexbert.yaml_config import load_yaml_config

pytestmark = pytest.mark.xdist_group("streaming")  # trainings never share the 2 cores (see test_finetune.py)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """About 20 rows of 64 tokens per rank: an epoch ends every few steps."""
    rng = random.Random(5)
    return write_corpus(
        tmp_path_factory.mktemp("corpus"),
        {"web": [rng.randint(5, 100) for _ in range(24)], "code": [rng.randint(5, 100) for _ in range(24)]},
    )


def logged(run_dir: Path, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in read_metrics(run_dir) if key in row}


# --- pretraining ------------------------------------------------------------------------------------


def test_pretraining_with_eval_export_warmup_and_an_epoch_boundary(small_corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    warmup = {"start_rows": 4, "duration": "1_500tok"}
    recipe = tiny_recipe(
        small_corpus,
        tmp_path,
        max_duration="10ba",
        save_interval="5ba",
        eval_interval="5ba",
        global_batch_rows=8,
        device_microbatch_rows=2,
        batch_warmup=warmup,
        hf_export={"interval": "5ba"},
        eval_loader={
            "tokenizer": str(TOKENIZER),
            "max_seq_len": 64,
            "rows_per_batch": 2,
            "shuffle": False,
            "epochs": 1,
            "streams": {"web": {"local": str(small_corpus / "web")}},
        },
        **{"logging.peak_tflops": 1.0, "train_loader.sample_batch_size": 4},
    )
    run_recipe(write_recipe(tmp_path / "recipe.yaml", recipe), nproc=2)
    run_dir = tmp_path / "tiny"

    # The ranks stayed in step through the warmup and across epochs: at every step each emitted the
    # rows the schedule asked for, given the rows all ranks emitted before.
    schedule = BatchSizeSchedule(8, 2, 2, 64, BatchWarmupConfig(**warmup))
    rows, emitted = logged(run_dir, "batch/rows"), 0  # logged as the step ends, so under the next step's number
    for step in range(1, 11):
        assert rows[step] == 2 * schedule(emitted), (step, rows)
        emitted += rows[step]
    assert rows[1] == 4 and rows[10] == 8
    pieces = trained_pieces(run_dir)
    assert max(pieces.values()) >= 2  # a second epoch began
    per_rank = read_data_order(run_dir)
    assert [row["step"] for row in per_rank[0]] == [row["step"] for row in per_rank[1]] == list(range(10))

    # Evaluation ran to the end of its finite loader on both ranks without either waiting forever.
    assert sorted(logged(run_dir, "metrics/eval/LanguageCrossEntropy")) == [5, 10]

    # Rank 0 exported while rank 1 waited; the final export holds the final weights.
    assert sorted(p.name for p in (run_dir / "hf").iterdir()) == ["ba10", "ba5"]
    hf_model, info = transformers.AutoModelForMaskedLM.from_pretrained(
        run_dir / "hf" / "ba10", output_loading_info=True
    )
    assert not any(info.values())
    final = torch.load(run_dir / "checkpoints" / LATEST_LINK, weights_only=False)["state"]["model"]
    assert all(torch.equal(tensor, final[f"model.{name}"]) for name, tensor in hf_model.state_dict().items())


def _rank_process(launcher: int, rank: int) -> int:
    """The pid of the launcher's child that runs ``rank``, read from its environment."""
    for process in Path("/proc").iterdir():
        try:
            children_of_launcher = f"\nPPid:\t{launcher}\n" in (process / "status").read_text()
            if children_of_launcher and f"RANK={rank}".encode() in (process / "environ").read_bytes().split(b"\0"):
                return int(process.name)
        except (OSError, ValueError):
            continue  # not a process, or one that has just ended
    raise AssertionError(f"no process of rank {rank} under the launcher")


@pytest.mark.parametrize("signalled", ["every process", "rank 1 alone"])
def test_sigterm_stops_both_ranks_at_the_same_step_with_a_checkpoint_then_resumes(small_corpus, tmp_path, signalled):
    recipe = tiny_recipe(
        small_corpus,
        tmp_path,
        max_duration="100000ba",
        save_interval="100000ba",
        autoresume=True,
        global_batch_rows=8,
        **{"logging.peak_tflops": 1.0},
    )
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    process = subprocess.Popen(
        command(path, nproc=2),
        cwd=ROOT,
        env=environment(2),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = tmp_path / "tiny" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert process.poll() is None and time.monotonic() < deadline, "the run never got going"
        time.sleep(0.5)
    if signalled == "every process":
        # A scheduler's preemption signals every process of the job; the launcher itself just dies.
        os.killpg(process.pid, signal.SIGTERM)
    else:
        # One rank's node is preempted first; the other rank learns of it through the stop vote.
        os.kill(_rank_process(process.pid, 1), signal.SIGTERM)
    while time.monotonic() < deadline:
        process.poll()  # reap the launcher, or it stays in the group as a zombie
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break  # every rank has exited
        time.sleep(0.5)
    else:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the ranks did not exit after SIGTERM")
    saved = list((tmp_path / "tiny" / "checkpoints").glob("ep0-ba*-rank0.pt"))
    assert len(saved) == 1
    stopped = int(saved[0].name.split("-ba")[1].split("-")[0])
    steps = {rank: [row["step"] for row in rows] for rank, rows in read_data_order(tmp_path / "tiny").items()}
    assert steps[0] == steps[1] == list(range(stopped))  # both ranks stopped after the same step

    resumed = {**recipe, "max_duration": f"{stopped + 2}ba"}
    run_recipe(write_recipe(path, resumed), nproc=2)
    assert sorted(logged(tmp_path / "tiny", "loss/train/total")) == list(range(stopped + 2))


def _vote_on_rank(rank: int, store_path: str, signalled_at: dict[int, int], stopped_at) -> None:
    """One rank of a gloo world: SigtermCheckpoint's batch_end, with SIGTERM seen after batch
    ``signalled_at[rank]`` (if any); records the batch whose end stopped training."""
    import torch.distributed as torch_dist

    from flexbert.train.resume import SigtermCheckpoint

    os.environ["WORLD_SIZE"] = "2"
    torch_dist.init_process_group("gloo", store=torch_dist.FileStore(store_path, 2), rank=rank, world_size=2)

    class State:
        stopped = False

        def stop_training(self):
            self.stopped = True

    callback, state = SigtermCheckpoint("1000ba"), State()
    for batch in range(1, 20):
        callback.requested = callback.requested or batch >= signalled_at.get(rank, 10**9)
        callback.batch_end(state, None)
        if state.stopped:
            stopped_at[rank] = batch
            break
    torch_dist.destroy_process_group()


@pytest.mark.parametrize("signalled_at", [{1: 3}, {0: 4, 1: 2}])
def test_ranks_that_see_sigterm_at_different_batches_stop_at_one_batch(tmp_path, signalled_at):
    """The stop vote read at a batch is the one launched VOTE_LAG batches earlier, on every rank:
    the first rank to see the signal decides the batch, and no rank waits on a vote it just sent."""
    import torch.multiprocessing as multiprocessing

    from flexbert.train.resume import SigtermCheckpoint

    stopped_at = multiprocessing.Manager().dict()
    multiprocessing.spawn(_vote_on_rank, args=(str(tmp_path / "store"), signalled_at, stopped_at), nprocs=2)
    first = min(signalled_at.values())
    assert dict(stopped_at) == {0: first + SigtermCheckpoint.VOTE_LAG, 1: first + SigtermCheckpoint.VOTE_LAG}


@pytest.mark.parametrize("action", ["stop", "skip"])
def test_nan_on_one_rank_is_caught_on_every_rank(small_corpus, tmp_path, action):
    recipe = tiny_recipe(
        small_corpus,
        tmp_path,
        max_duration="5ba",
        global_batch_rows=8,
        **{"nan_guard.action": action, "logging.peak_tflops": 1.0},
    )
    stderr = run_recipe(
        write_recipe(tmp_path / "recipe.yaml", recipe),
        nproc=2,
        script=ROOT / "tests" / "nan_at_step.py",
        fails=action == "stop",
        FLEXBERT_TEST_NAN_STEP="2",
        FLEXBERT_TEST_NAN_RANK="1",
    )
    record = json.loads((tmp_path / "tiny" / "nan_guard.jsonl").read_text())
    assert record["step"] == 2 and len(record["pieces_per_rank"]) == 2 and all(record["pieces_per_rank"])
    losses = logged(tmp_path / "tiny", "loss/train/total")
    if action == "stop":
        assert "flexbert: error: nan_guard: step 2 has a NaN or infinite loss and gradient" in stderr
        assert sorted(losses) == [0, 1]
    else:
        assert sorted(losses) == list(range(5))
        assert logged(tmp_path / "tiny", "nan_guard/skipped_steps") == {2: 1}
        final = torch.load(tmp_path / "tiny" / "checkpoints" / LATEST_LINK, weights_only=False)["state"]["model"]
        assert all(torch.isfinite(tensor).all() for tensor in final.values())


# --- fine-tuning and sweeps -----------------------------------------------------------------------------

POSITIVE, NEGATIVE, FILLER = ["good", "great", "fine"], ["bad", "awful", "poor"], ["the", "film", "was", "plot", "a"]


def write_sentiment(path: Path, count: int, seed: int) -> Path:
    """A learnable two-class task: a sentence's label is whether its sentiment word is positive."""
    rng = random.Random(seed)
    with path.open("w", newline="") as file:
        writer = csv.writer(file, delimiter="\t")
        writer.writerow(["sentence", "label"])
        for _ in range(count):
            label = rng.random() < 0.5
            words = rng.choices(FILLER, k=rng.randint(2, 8))
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
            writer.writerow([" ".join(words), int(label)])
    return path


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sentiment")
    return write_sentiment(folder / "train.tsv", 96, seed=0), write_sentiment(folder / "dev.tsv", 41, seed=1)


def finetune_recipe(train: Path, dev: Path, run_root: Path) -> dict:
    return load_yaml_config(
        ROOT / "yamls" / "finetune" / "sst2.yaml",
        [
            f"tokenizer={TOKENIZER}",
            f"run_root={run_root}",
            f"train_split.path={train}",
            f"eval_splits.eval.path={dev}",
            "model.hidden_size=32",
            "model.num_hidden_layers=2",
            "model.num_attention_heads=2",
            "model.intermediate_size=48",
            "model.attn_backend=sdpa",
            "max_duration=2ep",
            "eval_interval=1ep",
            "batch_size=16",
            "optimizer.lr=2e-3",
            "logging.progress_bar=false",
            "load_path=null",
        ],
    )


def test_a_sweep_trains_its_runs_on_two_processes_as_one_would(sentiment, tmp_path, capsys):
    """Each rank trains on its own half of every batch and evaluates its own part of the dev split,
    and the metrics, gathered over the ranks, equal a one-process run's."""
    train, dev = sentiment
    write_recipe(tmp_path / "sst2.yaml", finetune_recipe(train, dev, tmp_path / "unused"))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump({"recipe": "sst2.yaml", "grid": {"seed": [1]}, "nproc": 2, "metrics": ["metrics/eval/accuracy"]})
    )
    assert run_sweep(sweep, tmp_path / "two") == 0, capsys.readouterr().out
    assert run_sweep(sweep, tmp_path / "one", nproc=1) == 0, capsys.readouterr().out
    two, one = tmp_path / "two" / "sst2-seed1", tmp_path / "one" / "sst2-seed1"
    for key in ("metrics/eval/accuracy", "loss/train/total"):
        a, b = logged(two, key), logged(one, key)
        assert a.keys() == b.keys() and a, key
        assert max(abs(a[step] - b[step]) for step in a) <= 1e-5, (key, a, b)
    # Samples are counted over both ranks: an epoch is the split once, not once per rank.
    assert logged(two, "time/sample") == logged(one, "time/sample")
    assert max(logged(two, "time/sample").values()) == 2 * 96  # two epochs of 96 examples
    with (tmp_path / "two" / "results.csv").open() as file:
        (row,) = csv.DictReader(file)
    final = logged(two, "metrics/eval/accuracy")
    assert row["status"] == "done" and float(row["metrics/eval/accuracy"]) == final[max(final)]


def test_labelled_batches_share_every_global_batch_out_over_the_ranks():
    from flexbert.data.labeled import global_batches, rank_shares

    for count, batch_size, world in ((41, 16, 2), (33, 16, 2), (7, 4, 3), (5, 8, 4)):
        shares = [list(rank_shares(count, batch_size, True, 3, rank, world)) for rank in range(world)]
        assert len({len(rank) for rank in shares}) == 1  # as many batches on every rank
        assert len(shares[0]) == len(global_batches(count, batch_size, world))
        assert all(len(batch) > 0 for rank in shares for batch in rank)
        seen = sorted(int(i) for rank in shares for batch in rank for i in batch)
        assert seen == list(range(count))  # every example once, over all ranks
        for step in range(len(shares[0])):  # each step's shares are one global batch, split near evenly
            sizes = [len(rank[step]) for rank in shares]
            assert max(sizes) - min(sizes) <= 1
    # One process sees the plain batches: 33 examples in 16s, the last one of a single example.
    assert [len(b) for b in rank_shares(33, 16, False, 0)] == [16, 16, 1]
    assert [len(b) for b in rank_shares(33, 16, False, 0, 0, 2)] == [8, 9]  # 1 example can't go to 2 ranks
