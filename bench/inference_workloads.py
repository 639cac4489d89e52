"""The paper's four inference workloads (ModernBERT, Table 2) and transformers' padded way of
embedding them, shared by ``bench_encode.py`` (CPU, scaled down) and ``gpu_check.py`` (a lent GPU).
Only torch and numpy are imported here: a bare GPU node has nothing else to count on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Workload:
    name: str
    lengths: np.ndarray  # tokens per document, [CLS] and [SEP] included

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


def workloads(short: int, long: int, short_length: int = 512, long_length: int = 8192, seed: int = 0) -> list[Workload]:
    """Short fixed and variable (``short`` documents of ``short_length``, or normal around half of it,
    sd a quarter of the mean), long fixed and variable (``long`` documents of ``long_length`` or
    around half of it); the paper's are 512 and 8192 tokens."""
    rng = np.random.default_rng(seed)

    def normal(count: int, limit: int) -> np.ndarray:
        mean = limit // 2
        return np.clip(rng.normal(mean, mean / 4, count).round(), 16, limit).astype(int)

    return [
        Workload(f"short fixed ({short_length})", np.full(short, short_length)),
        Workload(f"short variable (~{short_length // 2})", normal(short, short_length)),
        Workload(f"long fixed ({long_length})", np.full(long, long_length)),
        Workload(f"long variable (~{long_length // 2})", normal(long, long_length)),
    ]


def autocast(device: torch.device):
    """bf16 where the tensor cores pay for it, as ``flexbert encode`` runs; fp32 on the CPU."""
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")


def padded(model: torch.nn.Module, documents: list[np.ndarray], per_batch: int, device: torch.device) -> Callable:
    """transformers' way: ``ModernBertModel`` on padded batches of ``per_batch`` documents in corpus
    order, then mean pooling."""

    def run() -> None:
        for start in range(0, len(documents), per_batch):
            batch = documents[start : start + per_batch]
            width = max(len(document) for document in batch)
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, document in enumerate(batch):
                input_ids[row, : len(document)] = torch.from_numpy(document)
                attention_mask[row, : len(document)] = 1
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            with torch.inference_mode(), autocast(device):
                hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                mask = attention_mask[..., None].to(hidden.dtype)
                torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).float().cpu()

    return run
