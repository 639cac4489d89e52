"""The shipped recipes, end to end on a CPU, as docs/pretraining.md's "Smoke-test a recipe" runs them.

Each base and large phase runs from its YAML file as it stands (pretraining, context extension,
decay), changed only on the command line: model size, data location, durations, batch rows and
``load_path``. The decayed model is then exported and loaded in transformers 4.x (this environment) with our
logits, and base's also in 5.x (``.venv-hf5``, which ``make install`` lays over it).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from data_helpers import random_lengths, write_stream
from train_helpers import environment

from flexbert.cli import main as cli_main
from flexbert.core.checkpoint import model_from_checkpoint
from flexbert.train.loggers import read_metrics

pytestmark = pytest.mark.xdist_group("streaming")  # trains, and builds streaming datasets

# The mixture's streams (yamls/data/modernbert-mixture.yaml), under vars.data_remote, and its held-out one.
STREAMS = ["web/dclm", "web/fineweb-edu", "code/starcoder", "code/stack-v2", "science/arxiv", "science/pes2o", "eval"]
HF5 = ROOT / ".venv-hf5"
SIZES = {  # tiny stand-ins for base and large, each its own shape
    "base": [
        "model.hidden_size=32",
        "model.num_hidden_layers=3",
        "model.num_attention_heads=2",
        "model.intermediate_size=48",
    ],
    "large": [
        "model.hidden_size=48",
        "model.num_hidden_layers=4",
        "model.num_attention_heads=3",
        "model.intermediate_size=64",
    ],
}
PHASES = {  # recipe -> the overrides of its durations and batch rows
    "pretrain": [
        "max_duration=4ba",
        "global_batch_rows=4",
        "device_microbatch_rows=2",
        "batch_warmup.start_rows=2",
        "batch_warmup.duration=4_096tok",
    ],
    "context-extension": ["max_duration=2ba", "global_batch_rows=2", "device_microbatch_rows=1"],
    # Saves and evaluations at every batch, as the recipe's come together at every 1000th.
    "decay": ["max_duration=2ba", "global_batch_rows=2", "device_microbatch_rows=1", "save_interval=1ba"]
    + ["eval_interval=1ba"],
}


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """Tokenized MDS streams at the mixture's paths, with ids inside ModernBERT's vocabulary."""
    root = tmp_path_factory.mktemp("mds")
    for seed, name in enumerate(STREAMS):
        write_stream(root, name, random_lengths(40, seed=seed, high=400), vocab=50000, seed=seed)
    return root


def flexbert(capfd, *argv: str) -> str:
    """``flexbert ARGV`` (``main.py RECIPE`` is ``flexbert train RECIPE``) in this process, from the
    project root as a user runs it; its stderr."""
    code = cli_main(list(argv))
    err = capfd.readouterr().err
    assert code == 0, err[-3000:]
    return err


def hf_logits(model_dir: Path, inputs: Path, tag: str, env: dict | None = None) -> dict:
    """Logits of the exported model, computed by transformers in another process."""
    script = (
        "import sys, torch, transformers; model_dir, inputs, out = sys.argv[1:]; d = torch.load(inputs); "
        "m = transformers.AutoModelForMaskedLM.from_pretrained(model_dir).eval(); "
        "torch.save({'version': transformers.__version__, 'logits': m(input_ids=d['ids'], "
        "attention_mask=d['mask']).logits.detach()}, out)"
    )
    out = inputs.with_name(f"logits-{tag}.pt")
    done = subprocess.run(
        [sys.executable, "-c", script, str(model_dir), str(inputs), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("size", ["base", "large"])
def test_the_three_phases_then_export(size, mixture, tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipes name their tokenizer relative to the project root
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the recipes log to W&B
    runs = tmp_path / "runs"
    data = [f"vars.data_remote={mixture}", f"vars.data_cache={tmp_path / 'cache'}", f"run_root={runs}"]
    data.append("eval_subset_num_batches=2")
    previous = None
    for phase, overrides in PHASES.items():
        load = [f"load_path={runs / previous / 'checkpoints' / 'latest-rank0.pt'}"] if previous else []
        flexbert(capfd, "train", f"yamls/{phase}-{size}.yaml", *data, *SIZES[size], *overrides, *load)
        previous = f"modernbert-{size}-{phase}"
        steps = [row["step"] for row in read_metrics(runs / previous) if "loss/train/total" in row]
        assert steps == list(range(int(overrides[0].removeprefix("max_duration=").removesuffix("ba"))))
    # The release model: the decay's 3 best checkpoints by eval loss and its last, as documented.
    evaluated = [row["step"] for row in read_metrics(runs / previous) if "metrics/eval/LanguageCrossEntropy" in row]
    assert evaluated == [1, 2]
    checkpoint = tmp_path / "averaged.pt"
    flexbert(capfd, "average", "--run", str(runs / previous), "--best", "3", "--last", "--out", str(checkpoint))
    exported = flexbert(capfd, "export-hf", str(checkpoint), str(tmp_path / "hf"))
    assert "attention_dropout=0.0 (model.attention_probs_dropout)" in exported  # the recipes' 0.1 output dropout
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["max_position_embeddings"], config["global_rope_theta"], config["local_attention"]) == (
        8192,
        160_000.0,
        128,
    )

    ours, _ = model_from_checkpoint(checkpoint)
    ours.eval()
    ids = torch.randint(5, 50000, (2, 300), generator=torch.Generator().manual_seed(0))  # beyond the window
    mask = torch.ones_like(ids)
    mask[1, 170:] = 0
    with torch.no_grad():
        expected = ours(ids, mask).logits
    real = mask.bool()
    transformers = pytest.importorskip("transformers")
    assert transformers.__version__.startswith("4.")
    with torch.no_grad():
        four = (
            transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
            .eval()(input_ids=ids, attention_mask=mask)
            .logits
        )
    assert (four[real] - expected[real]).abs().max() <= 1e-4
    if size == "base":  # the recipe every user starts with: its export must load in 5.x too
        inputs = tmp_path / "inputs.pt"
        torch.save({"ids": ids, "mask": mask}, inputs)
        assert HF5.is_dir(), f"{HF5} is missing: `make install` lays transformers 5.x there"
        five = hf_logits(tmp_path / "hf", inputs, "5.x", env=environment(1, PYTHONPATH=str(HF5)))
        assert five["version"].startswith("5.")
        assert (five["logits"][real] - expected[real]).abs().max() <= 1e-4
