"""bench/gpu_check.py in its CPU smoke mode, as a bare GPU node would run it: without Composer,
streaming, tokenizers or any other package beyond torch and numpy, and with no data or tokenizer
file. So the one prepared GPU script never rots between the rare minutes a GPU is lent, and what it
measured survives a section that fails and a command that is cut off."""

import json
import subprocess
import sys

from conftest import ROOT

# What a bare GPU node lacks; each import of them fails in the script's process.
ABSENT = ("composer", "streaming", "omegaconf", "wandb", "datasets", "tokenizers", "transformers", "flash_attn")
INFERENCE_WORKLOADS = ["short fixed (64)", "short variable (~32)", "long fixed (256)", "long variable (~128)"]


def run_check(out, *args: str, before_main: str = "") -> subprocess.CompletedProcess:
    """The smoke check in a process without ABSENT's packages; ``before_main`` runs first, with the
    script's globals as ``check``, to stand a failure in for a section."""
    launcher = (
        f"import os, sys, runpy\nfor name in {ABSENT!r}:\n    sys.modules[name] = None\n"
        f"sys.argv = ['gpu_check.py', '--device', 'cpu', '--smoke', '--out', {str(out)!r}, *{list(args)!r}]\n"
        f"check = runpy.run_path({str(ROOT / 'bench' / 'gpu_check.py')!r}, run_name='gpu_check')\n"
        f"check = check['main'].__globals__\n{before_main}\n"
        "sys.exit(check['main']())\n"
    )
    return subprocess.run([sys.executable, "-c", launcher], cwd=out, capture_output=True, text=True, timeout=300)


def test_the_gpu_check_runs_in_smoke_mode_without_the_training_stack(tmp_path):
    done = run_check(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["environment"]["kernels"] == ["sdpa", "flex"]
    assert report["environment"]["missing"] == ["flash", "flash3"]
    agreement = {(row["kernel"], row["window"]): row for row in report["agreement"]}
    windows = ("global", "local 16", "global, causal", "local 16, causal")
    assert set(agreement) == {(k, w) for k in ("sdpa", "flex") for w in windows}
    assert all(row["ok"] and max(row[key] for key in ("out", "dq", "dk", "dv")) < 1e-4 for row in agreement.values())
    sections = {(row["section"], row["kernel"], row["compiled"]) for row in report["training"]}
    assert sections >= {
        ("pretraining", "sdpa", False),
        ("pretraining", "flex", True),
        ("context extension", "sdpa", True),
        ("fsdp2", "sdpa", False),
    }
    assert all(row["losses_finite"] and row["tokens_per_s"] > 0 for row in report["training"])
    # Without transformers, the inference section times ours alone on the four workloads, with the
    # kernel flexbert encode runs (auto: sdpa on a CPU).
    inference = report["inference"]
    assert [row["workload"] for row in inference] == INFERENCE_WORKLOADS
    assert all(row["ours_tokens_per_s"] > 0 and "ratio" not in row and row["kernel"] == "sdpa" for row in inference)
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.startswith("GPU check on ") and "| pretraining (2 × 128) | sdpa | off |" in table


def test_a_failing_section_is_recorded_and_the_check_goes_on(tmp_path):
    boom = "def boom(*args, **kwargs):\n    raise KeyError('a section broke')\ncheck['inference_section'] = boom"
    done = run_check(tmp_path, before_main=boom)
    assert done.returncode == 1  # a failed section fails the check
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["inference"] == [{"section": "inference", "error": "KeyError: 'a section broke'"}]
    assert {row["section"] for row in report["training"]} == {"pretraining", "context extension", "fsdp2"}
    assert "| inference |  |  | — | — | — | KeyError: 'a section broke' |" in (tmp_path / "gpu_check.md").read_text()


def test_a_check_cut_off_keeps_every_row_measured_before(tmp_path):
    # The command limit kills the process: here, as it starts the FSDP section.
    killed = "check['fsdp_section'] = lambda *args, **kwargs: os._exit(137)"
    done = run_check(tmp_path, before_main=killed)
    assert done.returncode == 137
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert len(report["agreement"]) == 8  # 2 kernels x (global, local) x (bidirectional, causal)
    assert {row["section"] for row in report["training"]} == {"pretraining", "context extension"}
    assert [row["workload"] for row in report["inference"]] == INFERENCE_WORKLOADS
    assert "| context extension (2 × 128) | flex | on |" in (tmp_path / "gpu_check.md").read_text()
    assert not list(tmp_path.glob(".*.partial"))


def test_sections_that_would_not_fit_the_budget_are_skipped_and_said_so(tmp_path):
    done = run_check(tmp_path, "--budget", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    skipped = report["training"] + report["inference"]
    assert skipped and all(row["skipped"].startswith("time budget (") for row in skipped)
    assert {row["section"] for row in report["training"]} == {"pretraining", "context extension", "fsdp2"}
    assert len(report["agreement"]) == 8  # seconds, so it always runs
