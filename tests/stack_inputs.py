"""The inputs on which two stacks must compute the same outputs, and how each output is computed:
shared by ``stack_fixtures.py`` (the training environment, which writes the references) and
``test_newest_stack.py`` (any environment with the core install, which reproduces them)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import transformers

from flexbert.core.beir import RetrievalSplit, write_split
from flexbert.core.checkpoint import model_from_checkpoint
from flexbert.core.model import FlexBertForMaskedLM

# Documents of token ids, packed back to back: the encoder's input in every comparison.
DOCUMENT_LENGTHS = (7, 30, 64, 19)
TEXTS = [
    "A tokenizer splits text into pieces.",
    "Rotary embeddings rotate queries and keys by their position.",
    "Local attention layers see a window of 128 tokens.",
    "",
    "def add(a, b):\n    return a + b",
    "Encoders read the whole sequence at once, in both directions.",
]


def packed_input() -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [T], cu_seqlens [documents + 1]) of ids the tiny runs trained on (below 400)."""
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(5, 400, (sum(DOCUMENT_LENGTHS),), generator=generator)
    cu_seqlens = torch.tensor([0, *np.cumsum(DOCUMENT_LENGTHS)], dtype=torch.int32)
    return ids, cu_seqlens


def encoder_logits(checkpoint: Path, backend: str = "eager") -> torch.Tensor:
    """[T, vocab] logits of the checkpoint's masked LM over :func:`packed_input`, in fp32, computed
    by attention ``backend``."""
    loaded, _ = model_from_checkpoint(checkpoint)
    model = FlexBertForMaskedLM(dataclasses.replace(loaded.config, attn_backend=backend))
    model.load_state_dict(loaded.state_dict())
    ids, cu_seqlens = packed_input()
    with torch.no_grad():
        return model.eval()(ids, cu_seqlens=cu_seqlens, max_seqlen=max(DOCUMENT_LENGTHS)).logits.float()


def hf_logits(hf_dir: Path) -> torch.Tensor:
    """[T, vocab] logits of transformers' ModernBertForMaskedLM over the same documents, padded into
    one batch, at the real tokens only."""
    model = transformers.AutoModelForMaskedLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    ids, cu_seqlens = packed_input()
    rows = torch.zeros(len(DOCUMENT_LENGTHS), max(DOCUMENT_LENGTHS), dtype=torch.long)
    mask = torch.zeros_like(rows)
    for row, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        rows[row, : end - start], mask[row, : end - start] = ids[start:end], 1
    with torch.no_grad():
        logits = model(input_ids=rows, attention_mask=mask).logits
    return logits[mask.bool()].float()


def retrieval_task(out: Path) -> Path:
    """A small BEIR folder over :data:`TEXTS`: each query's relevant document shares its words."""
    queries = {"q0": "pieces of text", "q1": "position of queries", "q2": "a window of tokens", "q3": "add numbers"}
    corpus = {f"d{index}": text or "empty" for index, text in enumerate(TEXTS)}
    qrels = {"q0": {"d0": 1}, "q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d4": 1, "d5": 1}}
    write_split(out / "eval", RetrievalSplit(queries, corpus, qrels))
    return out
