"""Sharded training on Composer's FSDP2, under ``composer -n 2`` on the CPU (gloo).

Against DDP on the same global batches: the same loss at every step. Sharded (DCP) checkpoints:
exact autoresume, the next phase starts from them (with FSDP or without), and ``export-hf`` puts
their shards back together without a GPU. HSDP, which gloo cannot run, stops with one line.
"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from train_helpers import run_recipe, tiny_recipe, write_corpus, write_recipe

from flexbert.core.checkpoint import LATEST_LINK, is_sharded, read_weights
from flexbert.train.data_order import read_data_order
from flexbert.train.loggers import read_metrics

pytestmark = pytest.mark.xdist_group("streaming")  # trainings never share the 2 cores

STEPS = 6
SHARED_SETTINGS = {
    "max_duration": f"{STEPS}ba",
    "save_interval": "3ba",
    "global_batch_rows": 8,
    "autoresume": True,
    "logging.peak_tflops": 1.0,
}


def losses(run_dir):
    return [row["loss/train/total"] for row in read_metrics(run_dir) if "loss/train/total" in row]


@pytest.fixture(scope="session")  # not module: xdist may run another module's tests in between
def runs(tmp_path_factory):
    """A DDP run, an FSDP2 run (activation checkpointing on, weights kept gathered between forward
    and backward, the hf_export callback), and an FSDP2 run stopped after step 3 and resumed by the
    same command."""
    root = tmp_path_factory.mktemp("sharding")
    corpus = write_corpus(root / "corpus")
    recipes = {
        "ddp": tiny_recipe(corpus, root / "ddp", **SHARED_SETTINGS),
        "fsdp": tiny_recipe(
            corpus,
            root / "fsdp",
            **SHARED_SETTINGS,
            hf_export={"interval": "3ba"},
            fsdp_config={"activation_checkpointing": True, "reshard_after_forward": False},
        ),
        "resumed": tiny_recipe(corpus, root / "resumed", **SHARED_SETTINGS, fsdp_config={}),
    }
    for name, recipe in recipes.items():
        path = write_recipe(root / f"{name}.yaml", recipe)
        if name == "resumed":
            run_recipe(write_recipe(root / "first-half.yaml", {**recipe, "max_duration": "3ba"}), nproc=2)
        run_recipe(path, nproc=2)
    return {name: root / name / "tiny" for name in recipes} | {"corpus": corpus, "root": root}


def test_fsdp2_trains_as_ddp_does(runs):
    ddp, fsdp = losses(runs["ddp"]), losses(runs["fsdp"])
    assert len(ddp) == len(fsdp) == STEPS
    assert max(abs(a - b) for a, b in zip(ddp, fsdp)) <= 1e-4, (ddp, fsdp)
    assert read_data_order(runs["fsdp"]) == read_data_order(runs["ddp"])
    # The same final weights, read from DDP's file and put back together from FSDP's shards.
    whole, _ = read_weights(runs["ddp"] / "checkpoints" / LATEST_LINK)
    sharded, _ = read_weights(runs["fsdp"] / "checkpoints" / LATEST_LINK)
    assert whole.keys() == sharded.keys()
    assert max((whole[k] - sharded[k]).abs().max().item() for k in whole) <= 1e-4


def test_sharded_checkpoints_and_exact_autoresume(runs):
    checkpoints = runs["resumed"] / "checkpoints"
    for step in (3, 6):  # one shard per rank, and the metadata that ties them together
        assert sorted(p.name for p in (checkpoints / f"ep0-ba{step}").iterdir()) == [
            ".metadata",
            "__0_0.distcp",
            "__1_0.distcp",
        ]
    assert is_sharded(checkpoints / LATEST_LINK)
    resumed, uninterrupted = losses(runs["resumed"]), losses(runs["fsdp"])
    assert len(resumed) == STEPS and max(abs(a - b) for a, b in zip(resumed, uninterrupted)) <= 1e-6
    assert read_data_order(runs["resumed"]) == read_data_order(runs["fsdp"])
    final, _ = read_weights(checkpoints / LATEST_LINK)
    expected, _ = read_weights(runs["fsdp"] / "checkpoints" / LATEST_LINK)
    assert max((final[k] - expected[k]).abs().max().item() for k in final) <= 1e-6


@pytest.mark.parametrize("sharded_next_phase", [True, False])
def test_the_next_phase_starts_from_shards(runs, tmp_path, sharded_next_phase):
    """load_weights_only from a sharded checkpoint, into FSDP2 or into one plain process. The first
    step's learning rate is 0, so the checkpoint the next phase writes holds the weights it loaded."""
    source = runs["fsdp"] / "checkpoints" / LATEST_LINK
    recipe = tiny_recipe(
        runs["corpus"],
        tmp_path,
        run_name="phase2",
        load_path=str(source),
        max_duration="1ba",
        save_interval="1ba",
        **{"scheduler.warmup": "2ba", "logging.peak_tflops": 1.0},
        **({"fsdp_config": {}, "global_batch_rows": 8} if sharded_next_phase else {}),
    )
    run_recipe(write_recipe(tmp_path / "phase2.yaml", recipe), nproc=2 if sharded_next_phase else 1)
    written = tmp_path / "phase2" / "checkpoints" / LATEST_LINK
    assert is_sharded(written) == sharded_next_phase
    loaded, _ = read_weights(written)
    expected, _ = read_weights(source)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_export_hf_puts_the_shards_back_together(runs, tmp_path):
    """After training, from the sharded checkpoint folder; during training, by the hf_export
    callback, which gathers the shards on every rank and writes from rank 0."""
    transformers = pytest.importorskip("transformers")
    checkpoint = runs["fsdp"] / "checkpoints" / LATEST_LINK
    done = subprocess.run(
        [sys.executable, "-m", "flexbert.cli", "export-hf", str(checkpoint), str(tmp_path / "hf")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    weights, _ = read_weights(checkpoint)
    for exported in (tmp_path / "hf", runs["fsdp"] / "hf" / f"ba{STEPS}"):
        hf_model = transformers.AutoModelForMaskedLM.from_pretrained(exported)
        assert all(torch.equal(tensor, weights[name]) for name, tensor in hf_model.state_dict().items())
        assert json.loads((exported / "config.json").read_text())["hidden_size"] == 32
    assert sorted(p.name for p in (runs["fsdp"] / "hf").iterdir()) == ["ba3", "ba6"]


def test_hsdp_on_gloo_stops_in_one_line(runs, tmp_path):
    recipe = tiny_recipe(runs["corpus"], tmp_path, global_batch_rows=8, fsdp_config={"replicate_degree": 2})
    stderr = run_recipe(write_recipe(tmp_path / "hsdp.yaml", recipe), nproc=2, fails=True)
    assert (
        "flexbert: error: fsdp_config.replicate_degree: HSDP (replicate_degree 2) needs NCCL: gloo, the CPU "
        "backend, cannot average gradients over a replica group (ReduceOp.AVG)"
    ) in stderr
    assert not (tmp_path / "tiny" / "checkpoints").exists()
