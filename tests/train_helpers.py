"""A tiny training setup: MDS streams of easy-to-learn documents and a small recipe around them."""

from __future__ import annotations

from pathlib import Path

import yaml
from data_helpers import random_lengths, write_stream

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER = SHARED / "tokenizers" / "modernbert"


def write_corpus(root: Path, lengths: dict[str, list[int]] | None = None) -> Path:
    """Documents over 400 token ids only, so a tiny model's loss falls fast from ln(50368)."""
    lengths = lengths or {"web": random_lengths(150, seed=1, high=300), "code": random_lengths(100, seed=2, high=300)}
    for seed, (name, stream_lengths) in enumerate(lengths.items()):
        write_stream(root, name, stream_lengths, vocab=400, seed=seed)
    return root


def tiny_recipe(corpus: Path, run_root: Path, **overrides) -> dict:
    recipe = {
        "run_name": "tiny",
        "run_root": str(run_root),
        "model": {"preset": "modernbert-base", "hidden_size": 32, "num_hidden_layers": 2,
                  "num_attention_heads": 2, "intermediate_size": 48, "local_attention": 16,
                  "global_rope_theta": 10000.0, "local_rope_theta": 10000.0, "attn_backend": "sdpa"},
        "train_loader": {"tokenizer": str(TOKENIZER), "max_seq_len": 64, "rows_per_batch": 4,
                         "sample_batch_size": 8, "shuffle": False,
                         "streams": {name: {"local": str(corpus / name)} for name in ("web", "code")}},
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
