"""An embedding model, and how documents are embedded: framed ``[CLS] tokens [SEP]``, sorted by
length, and run in unpadded batches under a token budget. torch and the model alone: ``flexbert
encode``, retrieval evaluation and the GPU check all embed through here."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flexbert.core.model import FlexBertConfig, FlexBertForSentenceEmbedding
from flexbert.core.model.classification import Pooling


@dataclass(frozen=True)
class Embedder:
    """An embedding model ready to use: ``model.embed(...)`` gives unit vectors, one per document."""

    path: Path  # where it was loaded from
    model: FlexBertForSentenceEmbedding  # in eval mode, on the CPU, in the checkpoint's dtype
    tokenizer_dir: Path | None  # the tokenizer it was trained with, where the source names one
    max_seq_len: int  # longest input, [CLS] and [SEP] included: the fine-tune's, else the model's positions
    pooling: Pooling

    @property
    def config(self) -> FlexBertConfig:
        return self.model.config


@dataclass(frozen=True)
class Framing:
    """How a document becomes the model's input: [CLS] tokens [SEP], cut to ``max_seq_len``."""

    cls_id: int
    sep_id: int
    max_seq_len: int

    def __call__(self, tokens: np.ndarray | list[int]) -> np.ndarray:
        body = np.asarray(tokens, dtype=np.int64)[: self.max_seq_len - 2]
        return np.concatenate(([self.cls_id], body, [self.sep_id]))


def length_sorted_batches(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Document indices, longest first, cut into batches of at most ``max_tokens`` tokens (a longer
    document is a batch of its own)."""
    order = np.argsort(-lengths, kind="stable")
    batches, start, tokens = [], 0, 0
    for end, index in enumerate(order):
        if end > start and tokens + lengths[index] > max_tokens:
            batches.append(order[start:end])
            start, tokens = end, 0
        tokens += lengths[index]
    return batches + [order[start:]] if len(order) else batches


def embed_stream(embedder: Embedder, documents: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """[docs, hidden] float32 vectors of framed ``documents``, run as one unpadded stream."""
    lengths = torch.tensor([len(document) for document in documents])
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    input_ids = torch.from_numpy(np.concatenate(documents))
    # bf16 where the tensor cores pay for it; the CPU computes in float32.
    precision = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with torch.inference_mode(), precision:
        vectors = embedder.model.embed(
            input_ids.to(device), cu_seqlens=cu_seqlens.to(device), max_seqlen=int(lengths.max())
        )
    return vectors.float().cpu()


def embed_documents(
    embedder: Embedder, documents: list[np.ndarray], max_tokens: int, device: torch.device
) -> np.ndarray:
    """[docs, hidden] float32 vectors of framed ``documents``, in their order, computed in
    length-sorted batches of at most ``max_tokens`` tokens."""
    lengths = np.array([len(document) for document in documents])
    vectors = np.empty((len(documents), embedder.config.hidden_size), dtype=np.float32)
    for batch in length_sorted_batches(lengths, max_tokens):
        vectors[batch] = embed_stream(embedder, [documents[i] for i in batch], device).numpy()
    return vectors
