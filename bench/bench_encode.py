"""Inference speed of embedding a corpus, side by side in one process: ``flexbert encode``'s way
against transformers' ModernBertModel on padded batches and against sentence-transformers' encode,
on the four workloads of ModernBERT's paper (Table 2), scaled down.

    .venv/bin/python bench/bench_encode.py [--layers N] [--documents-short N] [--documents-long N]
        [--max-tokens-per-batch N] [--repeats N] [--device cpu|cuda]

The model is the ``modernbert-base`` preset (width 768, 12 heads, local window 128, global attention
every third layer) with ``--layers`` layers, randomly initialised; all three contenders run the same
weights, in fp32 on the CPU and under bf16 autocast on a GPU:

* **ours**: :func:`flexbert.core.encode.embed_documents`, what ``flexbert encode`` runs: documents sorted
  by length, cut into batches of at most ``--max-tokens-per-batch`` tokens, each batch one unpadded
  stream (``cu_seqlens``), sdpa backend;
* **transformers**: ``ModernBertModel`` (``attn_implementation="sdpa"``) on padded batches in corpus
  order, as many documents per batch as the workload's longest document fits in the same token
  budget (at least one), then the same mean pooling;
* **sentence-transformers**: ``SentenceTransformer.encode`` of the texts, loaded from the directory
  ``flexbert export-st`` writes, with the same number of documents per batch (it sorts them by
  length itself). It also tokenizes the texts, which the other two are handed tokenized.

Workloads, as in the paper (lengths in tokens, [CLS] and [SEP] included): short fixed (512), short
variable (normal, mean 256, sd 64, cut to 16..512), long fixed (8192), long variable (normal, mean
4096, sd 1024, cut to 16..8192). Texts are words that the ModernBERT tokenizer keeps as one token
each, so every contender sees exactly the same tokens. Each contender embeds each workload's whole
corpus ``--repeats`` times after one warm-up pass, interleaved with the others; figures are medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from inference_workloads import autocast, padded, workloads

from flexbert.core.embedders import export_st
from flexbert.core.embedding import Embedder, embed_documents
from flexbert.core.hf import hf_config_from_flexbert
from flexbert.core.model import PRESETS, FlexBertConfig, FlexBertForSentenceEmbedding
from flexbert.core.tokenizer import load_tokenizer

TOKENIZER = Path(__file__).resolve().parents[1] / "tokenizers" / "modernbert"
# Words that the ModernBERT tokenizer keeps whole: " word" is one token each.
WORDS = "the of and to in is that for it as was with be by on not he this are or".split()


def texts_of(lengths: np.ndarray, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, length - 2)) for length in lengths]


def build(layers: int, device: torch.device, st_dir: Path) -> tuple[Embedder, torch.nn.Module, object]:
    """The same random weights three ways: our embedder, transformers' ModernBertModel (sdpa) and a
    SentenceTransformer loaded from export-st's directory."""
    import sentence_transformers
    import transformers

    tokenizer = load_tokenizer(TOKENIZER)
    config = FlexBertConfig(
        **{**PRESETS["modernbert-base"], "num_hidden_layers": layers},
        attn_backend="sdpa",
        pad_token_id=tokenizer.pad_id,
        cls_token_id=tokenizer.cls_id,
        sep_token_id=tokenizer.sep_id,
    )
    config.validate()
    torch.manual_seed(0)
    reference = transformers.ModernBertForMaskedLM(hf_config_from_flexbert(config, attn_implementation="sdpa"))
    model = FlexBertForSentenceEmbedding(config, pooling="mean")
    weights = {name: tensor for name, tensor in reference.state_dict().items() if name.startswith("model.")}
    model.load_state_dict(weights)
    embedder = Embedder(st_dir, model.eval(), TOKENIZER, config.max_position_embeddings, "mean")
    export_st(embedder, st_dir, overwrite=True)
    st_model = sentence_transformers.SentenceTransformer(
        str(st_dir), device=str(device), model_kwargs={"attn_implementation": "sdpa"}
    )
    embedder.model.to(device)
    return embedder, reference.model.to(device).eval(), st_model


def ours(embedder: Embedder, documents: list[np.ndarray], budget: int, device: torch.device) -> Callable[[], None]:
    return lambda: embed_documents(embedder, documents, budget, device)


def sentence_transformers_encode(st_model, texts: list[str], per_batch: int, device: torch.device):
    def run() -> None:
        with autocast(device):
            st_model.encode(texts, batch_size=per_batch, convert_to_numpy=True)

    return run


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def side_by_side(contenders: dict[str, Callable[[], None]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds per pass of each contender; passes interleaved round by round, in reverse
    order every other round, so that drift on a busy machine hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(repeats):
        order = list(contenders.items())
        for name, run in order if round_ % 2 == 0 else order[::-1]:
            synchronize(device)
            started = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def tokenized(texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(encoding.ids) for encoding in load_tokenizer(TOKENIZER).tokenizer.encode_batch(texts)]


def contenders(
    embedder: Embedder, hf_model, st_model, texts: list[str], budget: int, device: torch.device
) -> dict[str, Callable[[], None]]:
    """The three ways to embed ``texts``: the two that take token ids are handed them tokenized."""
    documents = tokenized(texts)
    per_batch = max(1, budget // max(len(document) for document in documents))
    return {
        "ours (unpadded, sorted)": ours(embedder, documents, budget, device),
        "transformers (sdpa, padded)": padded(hf_model, documents, per_batch, device),
        "sentence-transformers": sentence_transformers_encode(st_model, texts, per_batch, device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=3, help="layers of the base-width model (default: 3)")
    parser.add_argument("--documents-short", type=int, default=32, help="documents per short workload")
    parser.add_argument("--documents-long", type=int, default=2, help="documents per long workload")
    parser.add_argument("--max-tokens-per-batch", type=int, default=8192, help="token budget per batch")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per contender")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as scratch:
        embedder, hf_model, st_model = build(args.layers, device, Path(scratch) / "st")
        print(
            f"modernbert-base width, {args.layers} layers, {device.type}, "
            f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, {torch.get_num_threads()} threads; "
            f"token budget {args.max_tokens_per_batch}"
        )
        # One untimed pass each over a few short documents: first calls allocate and dispatch.
        warm_up = contenders(embedder, hf_model, st_model, texts_of(np.full(8, 128)), args.max_tokens_per_batch, device)
        side_by_side(warm_up, device, repeats=1)
        for workload in workloads(args.documents_short, args.documents_long):
            texts = texts_of(workload.lengths)
            assert [len(document) for document in tokenized(texts)] == workload.lengths.tolist()
            runs = contenders(embedder, hf_model, st_model, texts, args.max_tokens_per_batch, device)
            seconds = side_by_side(runs, device, args.repeats)
            per_batch = max(1, args.max_tokens_per_batch // int(workload.lengths.max()))
            print(f"  {workload.name}: {len(texts)} documents, {workload.tokens:,} tokens, {per_batch} per batch")
            ours_seconds = seconds["ours (unpadded, sorted)"]
            for name, s in seconds.items():
                print(
                    f"    {name:<30} {workload.tokens / s:>10,.0f} tokens/s  {s:>7.2f} s   "
                    f"ours is {s / ours_seconds:4.2f}x as fast"
                )


if __name__ == "__main__":
    main()
