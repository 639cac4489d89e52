"""bench/gpu_check.py in its CPU smoke mode, as a bare GPU node would run it: without Composer,
streaming, tokenizers or any other package beyond torch and numpy, and with no data or tokenizer
file. So the one prepared GPU script never rots between the rare minutes a GPU is lent."""

import json
import subprocess
import sys

from conftest import ROOT

# What a bare GPU node lacks; each import of them fails in the script's process.
ABSENT = ("composer", "streaming", "omegaconf", "wandb", "datasets", "tokenizers", "transformers", "flash_attn")


def test_the_gpu_check_runs_in_smoke_mode_without_the_training_stack(tmp_path):
    launcher = (
        f"import sys, runpy\nfor name in {ABSENT!r}:\n    sys.modules[name] = None\n"
        f"sys.argv = ['gpu_check.py', '--device', 'cpu', '--smoke', '--out', {str(tmp_path)!r}]\n"
        f"runpy.run_path({str(ROOT / 'bench' / 'gpu_check.py')!r}, run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", launcher], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["environment"]["kernels"] == ["sdpa", "flex"]
    assert report["environment"]["missing"] == ["flash", "flash3"]
    agreement = {(row["kernel"], row["window"]): row for row in report["agreement"]}
    assert set(agreement) == {(k, w) for k in ("sdpa", "flex") for w in ("global", "local 16")}
    assert all(row["ok"] and max(row[key] for key in ("out", "dq", "dk", "dv")) < 1e-4 for row in agreement.values())
    sections = {(row["section"], row["kernel"], row["compiled"]) for row in report["training"]}
    assert sections >= {
        ("pretraining", "sdpa", False),
        ("pretraining", "flex", True),
        ("context extension", "sdpa", True),
        ("fsdp2", "sdpa", False),
    }
    assert all(row["losses_finite"] and row["tokens_per_s"] > 0 for row in report["training"])
    # Without transformers, the inference section times ours alone on the four workloads.
    inference = report["inference"]
    assert [row["workload"] for row in inference] == [
        "short fixed (64)",
        "short variable (~32)",
        "long fixed (256)",
        "long variable (~128)",
    ]
    assert all(row["ours_tokens_per_s"] > 0 and "ratio" not in row for row in inference)
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.startswith("GPU check on ") and "| pretraining (2 × 128) | sdpa | off |" in table
