"""The model side reproduces, on the stack it runs on, what the training environment computed from the
checkpoints that training wrote.

``make test`` runs this module in the training environment, which writes the checkpoints and the
reference outputs itself (``stack_fixtures.py``). ``make test-newest`` writes them with the training
environment, then runs this module in ``.venv-newest``: the newest torch, transformers 5.x and
sentence-transformers 6.x, with the core install alone (no Composer, streaming, OmegaConf or wandb).
Each output must equal the training environment's within 1e-5: the encoder's logits under every
attention backend that runs on a CPU, from whole-file and FSDP-sharded checkpoints; export-hf loaded
by transformers; import-hf back to the same weights; export-st loaded by sentence-transformers;
encode's vectors; eval-retrieval's metrics.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentence_transformers
import torch
from conftest import ROOT
from stack_inputs import TEXTS, encoder_logits, hf_logits

from flexbert.cli import TRAIN_EXTRA
from flexbert.cli import main as flexbert
from flexbert.core.checkpoint import read_weights
from flexbert.core.model.registries import ATTENTION_BACKENDS

pytestmark = pytest.mark.xdist_group("streaming")  # the fixtures train; trainings never share the 2 cores

# The training extra's packages, which the model side must never import.
TRAINING_ONLY = ("composer", "streaming", "omegaconf", "wandb", "torchmetrics", "matplotlib")
GPU_ONLY_BACKENDS = ("flash", "flash3")
TOLERANCE = 1e-5


@pytest.fixture(scope="session")
def fixtures(tmp_path_factory) -> Path:
    """The training environment's checkpoints and outputs: FLEXBERT_STACK_FIXTURES where ``make
    test-newest`` wrote them, else written now (this is the training environment)."""
    given = os.environ.get("FLEXBERT_STACK_FIXTURES")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("stack")
    script = ROOT / "tests" / "stack_fixtures.py"
    subprocess.run([sys.executable, str(script), str(out)], cwd=ROOT, check=True, timeout=900)
    return out


@pytest.fixture(scope="session")
def reference(fixtures) -> dict[str, torch.Tensor]:
    return torch.load(fixtures / "reference.pt", weights_only=True)


def checkpoint(fixtures: Path, kind: str) -> Path:
    return Path(json.loads((fixtures / "fixtures.json").read_text())["checkpoints"][kind])


def run(*argv: str) -> None:
    assert flexbert(list(argv)) == 0, argv


def assert_close(actual, expected, what: str, tolerance: float = TOLERANCE) -> None:
    difference = (torch.as_tensor(actual) - torch.as_tensor(expected)).abs().max().item()
    assert difference <= tolerance, f"{what}: max abs difference {difference:.2e} > {tolerance:.0e}"


@pytest.mark.parametrize("kind", ["whole", "sharded"])
@pytest.mark.parametrize("backend", [name for name in ATTENTION_BACKENDS.names() if name not in GPU_ONLY_BACKENDS])
def test_every_cpu_backend_gives_the_training_logits(fixtures, reference, kind, backend):
    assert_close(encoder_logits(checkpoint(fixtures, kind), backend), reference[f"logits/{kind}"], f"{kind} {backend}")


@pytest.mark.parametrize("kind", ["whole", "sharded"])
def test_export_hf_loads_in_this_transformers(fixtures, reference, tmp_path, kind):
    run("export-hf", str(checkpoint(fixtures, kind)), str(tmp_path / "hf"))
    logits = hf_logits(tmp_path / "hf")
    if kind == "whole":  # transformers of the training environment read the same export
        assert_close(logits, reference["hf_logits"], "transformers logits")
    # transformers' padded ModernBERT against our packed encoder (the parity tests' bound)
    assert_close(logits, reference[f"logits/{kind}"], "transformers vs flexbert", tolerance=1e-4)


def test_import_hf_gives_back_the_trained_weights(fixtures, tmp_path):
    trained = checkpoint(fixtures, "whole")
    run("export-hf", str(trained), str(tmp_path / "hf"))
    run("import-hf", str(tmp_path / "hf"), str(tmp_path / "imported.pt"))
    imported, _ = read_weights(tmp_path / "imported.pt")
    original, _ = read_weights(trained)
    assert imported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(imported[name], tensor), name


def test_export_st_loads_in_this_sentence_transformers(fixtures, reference, tmp_path):
    run("export-st", str(checkpoint(fixtures, "whole")), str(tmp_path / "st"), "--pooling", "mean")
    model = sentence_transformers.SentenceTransformer(str(tmp_path / "st"), device="cpu")
    embeddings = model.encode(TEXTS, convert_to_numpy=True)
    assert_close(embeddings, reference["st_embeddings"], f"sentence-transformers {sentence_transformers.__version__}")
    encoded = np.load(fixtures / "encoded" / "part-00000.npy")  # flexbert encode, training environment
    assert_close(embeddings, encoded, "sentence-transformers vs flexbert encode")


def test_encode_writes_the_training_vectors(fixtures, tmp_path):
    out = tmp_path / "encoded"
    run("encode", str(checkpoint(fixtures, "whole")), str(fixtures / "texts.jsonl"), str(out), "--pooling", "mean")
    trained = fixtures / "encoded"
    assert sorted(path.name for path in out.glob("part-*")) == sorted(path.name for path in trained.glob("part-*"))
    assert_close(np.load(out / "part-00000.npy"), np.load(trained / "part-00000.npy"), "encode")
    assert np.array_equal(np.load(out / "part-00000.ids.npy"), np.load(trained / "part-00000.ids.npy"))


def test_eval_retrieval_gives_the_training_metrics(fixtures, tmp_path):
    out = tmp_path / "retrieval.json"
    model = str(checkpoint(fixtures, "whole"))
    run("eval-retrieval", model, "--task", str(fixtures / "task"), "--pooling", "cls", "--out", str(out))
    ours, theirs = json.loads(out.read_text())["metrics"], json.loads((fixtures / "retrieval.json").read_text())
    assert ours.keys() == theirs["metrics"].keys()
    assert_close(list(ours.values()), list(theirs["metrics"].values()), "retrieval metrics")


def core_install(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``flexbert ARGV``, run in ``cwd``, in a process where the training extra's packages cannot be
    imported, as on a core install (where they are absent anyway)."""
    code = (
        f"import sys\nfor name in {TRAINING_ONLY!r}:\n    sys.modules[name] = None\n"
        "from flexbert.cli import main\nsys.exit(main(sys.argv[1:]))"
    )
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_model_side_commands_need_no_training_package(fixtures, tmp_path):
    exported = core_install(["export-hf", str(checkpoint(fixtures, "sharded")), str(tmp_path / "hf")], tmp_path)
    assert exported.returncode == 0, exported.stderr
    encoded = core_install(
        ["encode", str(checkpoint(fixtures, "whole")), str(fixtures / "texts.jsonl"), str(tmp_path / "e")]
        + ["--pooling", "cls"],
        tmp_path,
    )
    assert encoded.returncode == 0, encoded.stderr


@pytest.mark.parametrize("command", [["train", "recipe.yaml"], ["prepare", "corpus", "out"], ["sweep", "s.yaml"]])
def test_a_training_command_without_the_extra_names_it(command, tmp_path):
    done = core_install(command, tmp_path)
    assert done.returncode == 2
    assert not any(tmp_path.iterdir())  # nothing written
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"flexbert: error: flexbert {command[0]} needs the training extra, and "), line
    assert line.endswith(f"is not installed: {TRAIN_EXTRA}"), line


def test_mds_input_without_the_extra_names_it(fixtures, tmp_path):
    mds = fixtures / "corpus" / "web"
    done = core_install(
        ["encode", str(checkpoint(fixtures, "whole")), str(mds), str(tmp_path / "e"), "--pooling", "cls"], tmp_path
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"flexbert: error: {mds} is an MDS dataset; reading MDS needs mosaicml-streaming, which the training "
        f"extra installs: {TRAIN_EXTRA}"
    ], done.stderr
    assert not (tmp_path / "e").exists()
