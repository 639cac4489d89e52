"""A tiny training setup: MDS streams of easy-to-learn documents and a small recipe around them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import ROOT, TOKENIZER
from data_helpers import random_lengths, write_stream

from flexbert.data.tokenizer_training import train_tokenizer


def write_corpus(root: Path, lengths: dict[str, list[int]] | None = None) -> Path:
    """Documents over 400 token ids only, so a tiny model's loss falls fast from ln(50368)."""
    lengths = lengths or {"web": random_lengths(150, seed=1, high=300), "code": random_lengths(100, seed=2, high=300)}
    for seed, (name, stream_lengths) in enumerate(lengths.items()):
        write_stream(root, name, stream_lengths, vocab=400, seed=seed)
    return root


def write_demo_data(data: Path) -> Path:
    """The layout `make demo` writes under vars.data, at ``data``: a 4096-token tokenizer and three
    MDS streams (web, code, science) of 48 documents each."""
    text = data / "text.jsonl"
    text.parent.mkdir(parents=True)
    text.write_text("".join(json.dumps({"text": f"document {i} of the demo corpus"}) + "\n" for i in range(50)))
    train_tokenizer([text], data / "tokenizer", vocab_size=4096, show_progress=False)
    for seed, name in enumerate(("web", "code", "science")):
        write_stream(data / "mds", name, [60, 200, 35, 90, 150, 20] * 8, vocab=4096, seed=seed)
    return data


def tiny_recipe(corpus: Path, run_root: Path, **overrides) -> dict:
    recipe = {
        "run_name": "tiny",
        "run_root": str(run_root),
        "model": {
            "preset": "modernbert-base",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 48,
            "local_attention": 16,
            "global_rope_theta": 10000.0,
            "local_rope_theta": 10000.0,
            "attn_backend": "sdpa",
        },
        "train_loader": {
            "tokenizer": str(TOKENIZER),
            "max_seq_len": 64,
            "sample_batch_size": 8,
            "shuffle": False,
            "streams": {name: {"local": str(corpus / name)} for name in ("web", "code")},
        },
        "global_batch_rows": 4,
        "device_microbatch_rows": 2,
        "optimizer": {"name": "stable_adamw", "lr": 3.0e-3},
        "scheduler": {"name": "constant_with_warmup", "warmup": "2ba"},
        "max_duration": "6ba",
        "save_interval": "3ba",
        "eval_interval": "1000ba",
        "logging": {"progress_bar": False},
    }
    for key, value in overrides.items():
        target = recipe
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(recipe: Path, script: Path = ROOT / "main.py", nproc: int = 1) -> list[str]:
    """``python SCRIPT RECIPE``, or ``composer -n NPROC SCRIPT RECIPE`` as a user launches DDP."""
    if nproc == 1:
        return [sys.executable, str(script), str(recipe)]
    return [
        str(Path(sys.executable).with_name("composer")),
        "-n",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(script),
        str(recipe),
    ]


def environment(nproc: int, **variables: str) -> dict[str, str]:
    # Ranks that each start a thread per core would fight over the test machine's few cores.
    threads = {"OMP_NUM_THREADS": "1"} if nproc > 1 else {}
    return {**os.environ, **threads, **variables}


def run_recipe(
    recipe: Path, nproc: int = 1, script: Path = ROOT / "main.py", fails: bool = False, **variables: str
) -> str:
    """Train as ``python main.py RECIPE`` or ``composer -n NPROC main.py RECIPE`` would; its stderr
    (rank 0's, and a failed rank's, under the launcher), after checking that it exited 0, or not
    (the launcher's code for a failed run depends on which rank ended first)."""
    done = subprocess.run(
        command(recipe, script, nproc),
        cwd=ROOT,
        env=environment(nproc, **variables),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert (done.returncode != 0) == fails, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stderr
