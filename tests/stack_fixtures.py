"""Checkpoints and reference outputs written by the training environment, for the model side to
reproduce on another stack (``tests/test_newest_stack.py``; ``make test-newest`` runs it on the newest
torch, transformers 5.x and sentence-transformers 6.x).

    python tests/stack_fixtures.py OUT

trains two tiny runs with Composer (one process, whole-file checkpoints; two processes under FSDP2,
DCP shards), then writes what this environment computes from them: the encoder's logits, the
transformers export's logits, the sentence-transformers export's embeddings, ``flexbert encode``'s
shards and ``flexbert eval-retrieval``'s metrics. OUT/fixtures.json lists them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import sentence_transformers
import torch
import transformers
from stack_inputs import TEXTS, encoder_logits, hf_logits, retrieval_task
from train_helpers import run_recipe, tiny_recipe, write_corpus, write_recipe

from flexbert.cli import main as flexbert
from flexbert.core.checkpoint import LATEST_LINK


def run(command: list[str]) -> None:
    code = flexbert(command)
    if code != 0:
        raise SystemExit(f"flexbert {' '.join(command)} exited {code}")


def main(out: Path) -> None:
    corpus = write_corpus(out / "corpus")
    # Three layers (global, local, local) with the two thetas of ModernBERT, so that every export
    # carries the alternating pattern.
    model = {"model.num_hidden_layers": 3, "model.global_rope_theta": 160000.0}
    recipes = {
        "whole": tiny_recipe(corpus, out / "whole", **model),
        "sharded": tiny_recipe(corpus, out / "sharded", **model, global_batch_rows=8, fsdp_config={}),
    }
    for name, recipe in recipes.items():
        run_recipe(write_recipe(out / f"{name}.yaml", recipe), nproc=2 if name == "sharded" else 1)
    checkpoints = {name: out / name / "tiny" / "checkpoints" / LATEST_LINK for name in recipes}

    reference = {f"logits/{name}": encoder_logits(path) for name, path in checkpoints.items()}
    run(["export-hf", str(checkpoints["whole"]), str(out / "hf")])
    reference["hf_logits"] = hf_logits(out / "hf")
    run(["export-st", str(checkpoints["whole"]), str(out / "st"), "--pooling", "mean"])
    st_model = sentence_transformers.SentenceTransformer(str(out / "st"), device="cpu")
    reference["st_embeddings"] = torch.from_numpy(st_model.encode(TEXTS, convert_to_numpy=True))
    torch.save(reference, out / "reference.pt")

    (out / "texts.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    run(["encode", str(checkpoints["whole"]), str(out / "texts.jsonl"), str(out / "encoded"), "--pooling", "mean"])
    task = retrieval_task(out / "task")
    run(
        [
            "eval-retrieval",
            str(checkpoints["whole"]),
            "--task",
            str(task),
            "--pooling",
            "cls",
            "--out",
            str(out / "retrieval.json"),
        ]
    )

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    versions["sentence_transformers"] = sentence_transformers.__version__
    manifest = {"checkpoints": {name: str(path) for name, path in checkpoints.items()}, "versions": versions}
    (out / "fixtures.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]).absolute())
