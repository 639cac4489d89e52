"""Model speed, side by side in one process: FlexBERT against transformers' ModernBERT, unpadded
against padded compute, and the training step's model FLOPs utilisation (MFU).

    .venv/bin/python bench/bench_model.py [--preset modernbert-base] [--layers N]
        [--device cpu|cuda] [--dtype fp32|bf16] [--backend sdpa|flex|flash] [--compile]

Sections (each prints its figures and ratios):

(a) forward+backward tokens/s of our ``FlexBertForMaskedLM`` vs transformers'
    ``ModernBertForMaskedLM`` (sdpa), with the same weights and the same padded inputs
    (``input_ids`` + ``attention_mask``), on fixed-length batches (8 x 512, no padding) and on
    variable-length batches whose document lengths are drawn from the demo corpus (about half of
    the padded grid is padding). Both models predict only the masked tokens (transformers'
    ``sparse_prediction=True``), so they do the same useful work.
(b) our model on the variable-length batches: unpadded (what it does) vs padded compute (every row
    run as a full-length sequence, the work a padded encoder spends on the same batch).
(d) one training step (forward, backward, AdamW) on rows of packed documents: model FLOPs per
    second over the fp32/bf16 matmul peak measured in this run (the fastest of large square GEMMs,
    timed before and after the training steps).

Timings interleave the contenders repetition by repetition and report medians, so drift on a noisy
machine hits both alike. (c), the data pipeline, is ``bench_convert.py`` and ``bench_loader.py``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from flexbert.core.hf import from_hf, hf_config_from_flexbert
from flexbert.core.model import PRESETS, FlexBertConfig, FlexBertForMaskedLM
from flexbert.core.model.compile import compile_regions
from flexbert.core.model.losses import IGNORE_INDEX
from flexbert.train.flops import TrainingFlops

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[1] / "tokenizers" / "modernbert"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MASK_RATE = 0.3


@dataclass
class PaddedBatch:
    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S], 1 at real tokens
    labels: torch.Tensor  # [B, S], -100 where nothing is predicted

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.attention_mask.numel()

    def to(self, device: torch.device) -> PaddedBatch:
        return PaddedBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels)))


def corpus_document_lengths(tokenizer_dir: Path, source: str, count: int) -> list[int]:
    """Token counts of the first ``count`` documents of one demo-corpus source."""
    from flexbert.data import demo_corpus
    from tokenizers import Tokenizer

    documents = getattr(demo_corpus, f"{source}_documents")()
    texts = [doc.text for doc in itertools.islice(documents, count)]
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return [len(encoding.ids) for encoding in tokenizer.encode_batch(texts)]


def padded_batch(lengths: list[int], seq_len: int, vocab_size: int, generator: torch.Generator) -> PaddedBatch:
    """Random tokens in rows padded to ``seq_len``; ``MASK_RATE`` of the real tokens carry labels."""
    rows = len(lengths)
    input_ids = torch.randint(5, vocab_size, (rows, seq_len), generator=generator)
    attention_mask = (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()
    predicted = (torch.rand(rows, seq_len, generator=generator) < MASK_RATE) & attention_mask.bool()
    labels = torch.where(predicted, input_ids, IGNORE_INDEX)
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return PaddedBatch(input_ids, attention_mask, labels)


def packed_stream(
    lengths: list[int], rows: int, seq_len: int, vocab_size: int, generator: torch.Generator
) -> dict[str, torch.Tensor | int]:
    """Documents of the given lengths packed back to back into ``rows`` rows of ``seq_len`` tokens
    (a document that does not fit is cut at the row's end), as the loader's unpadded batch."""
    boundaries = [0]
    for row in range(rows):
        start, end = row * seq_len, (row + 1) * seq_len
        position = start
        for length in itertools.cycle(lengths):
            position = min(position + length, end)
            boundaries.append(position)
            if position == end:
                break
        lengths = lengths[1:] + lengths[:1]
    cu_seqlens = torch.tensor(boundaries, dtype=torch.int32)
    tokens = rows * seq_len
    input_ids = torch.randint(5, vocab_size, (tokens,), generator=generator)
    labels = torch.where(torch.rand(tokens, generator=generator) < MASK_RATE, input_ids, IGNORE_INDEX)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return dict(input_ids=input_ids, labels=labels, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def side_by_side(
    contenders: dict[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int
) -> dict[str, float]:
    """Median seconds per call of each contender, calls interleaved round by round, in reverse order
    every other round so that neither always runs right after the other."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(warmup + repeats):
        order = list(contenders.items())
        for name, step in order if round_ % 2 == 0 else order[::-1]:
            synchronize(device)
            started = time.perf_counter()
            step()
            synchronize(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...]) -> tuple[float, int]:
    """The best FLOP/s of square GEMMs of the given sizes (fastest of 10 calls each), and the size
    that reached it."""
    best = (0.0, 0)
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        for _ in range(10):
            synchronize(device)
            started = time.perf_counter()
            a @ b
            synchronize(device)
            best = max(best, (2 * n**3 / (time.perf_counter() - started), n))
    return best


def forward_backward(model: torch.nn.Module, batch: PaddedBatch, autocast: Callable) -> Callable[[], None]:
    def step() -> None:
        with autocast():
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def compare(
    title: str, tokens: int, contenders: dict[str, Callable[[], None]], device: torch.device, args: argparse.Namespace
) -> None:
    """Time ``contenders`` side by side and print tokens/s and each one's speed-up over the first."""
    seconds = side_by_side(contenders, device, args.repeats, args.warmup)
    baseline = next(iter(seconds))
    print(f"  {title}")
    for name, s in seconds.items():
        ratio = seconds[baseline] / s
        print(f"    {name:<34} {tokens / s:>12,.0f} tokens/s  {s * 1e3:>9.1f} ms   {ratio:5.2f}x {baseline}")


def build_models(args: argparse.Namespace, device: torch.device) -> tuple[FlexBertForMaskedLM, torch.nn.Module]:
    import transformers

    config = FlexBertConfig(
        **{
            **PRESETS[args.preset],
            "attn_backend": args.backend,
            **({"num_hidden_layers": args.layers} if args.layers else {}),
        }
    )
    config.validate()
    hf_config = hf_config_from_flexbert(
        config, attn_implementation="sdpa", sparse_prediction=True, reference_compile=args.compile
    )
    torch.manual_seed(0)
    reference = transformers.ModernBertForMaskedLM(hf_config)
    ours = from_hf(reference, attn_backend=args.backend)
    ours.config.compile_regions = list(args.compile_regions)
    compile_regions(ours, ours.config.compile_regions)
    return ours.to(device).train(), reference.to(device).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="modernbert-base", choices=sorted(PRESETS))
    parser.add_argument("--layers", type=int, help="override the preset's layer count (a shallower, same-width model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="bf16 runs under autocast")
    parser.add_argument("--backend", default="sdpa", help="our attention backend: sdpa, flex, flash or auto")
    parser.add_argument("--compile", action="store_true", help="transformers' reference_compile")
    parser.add_argument(
        "--compile-regions", nargs="*", default=[], metavar="REGION", help="our compiled regions (mlp, norm, head)"
    )
    parser.add_argument("--batch", type=int, default=8, help="rows per batch")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=DEFAULT_TOKENIZER,
        help="tokenizer that measures the demo corpus's document lengths",
    )
    parser.add_argument(
        "--length-source",
        default="science",
        choices=("web", "code", "science"),
        help="demo-corpus source whose document lengths make the variable-length batches",
    )
    parser.add_argument("--sections", default="abd", help="which sections to run")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.set_float32_matmul_precision("high")

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    ours, reference = build_models(args, device)
    config = ours.config
    generator = torch.Generator().manual_seed(0)
    doc_lengths = [min(n, args.seq_len) for n in corpus_document_lengths(args.tokenizer, args.length_source, 400)]
    doc_lengths = [n for n in doc_lengths if n > 0]
    print(
        f"{args.preset} ({config.num_hidden_layers} layers, hidden {config.hidden_size}), {args.device}, "
        f"{args.dtype}, ours: {args.backend} regions={args.compile_regions or 'none'}; "
        f"transformers {__import__('transformers').__version__}: sdpa reference_compile={args.compile}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    fixed = padded_batch([args.seq_len] * args.batch, args.seq_len, config.vocab_size, generator).to(device)
    variable_lengths = doc_lengths[: args.batch]
    variable = padded_batch(variable_lengths, max(variable_lengths), config.vocab_size, generator).to(device)

    if "a" in args.sections:
        print("(a) forward+backward, ours vs transformers, same weights and padded inputs")
        for name, batch in ((f"fixed {args.batch}x{args.seq_len}", fixed), ("variable", variable)):
            compare(
                f"{name}: {batch.real_tokens:,} real tokens, padding {batch.padding_fraction:.0%}",
                batch.real_tokens,
                {
                    "transformers ModernBertForMaskedLM": forward_backward(reference, batch, autocast),
                    "flexbert FlexBertForMaskedLM": forward_backward(ours, batch, autocast),
                },
                device,
                args,
            )

    if "b" in args.sections:
        print("(b) ours on the variable-length batch: unpadded vs padded compute")
        full = PaddedBatch(variable.input_ids, torch.ones_like(variable.attention_mask), variable.labels)
        compare(
            f"{variable.real_tokens:,} real tokens in a {tuple(variable.input_ids.shape)} grid",
            variable.real_tokens,
            {
                "padded (rows as full sequences)": forward_backward(ours, full, autocast),
                "unpadded": forward_backward(ours, variable, autocast),
            },
            device,
            args,
        )

    if "d" in args.sections:
        gemm_sizes = (1024, 2048, 4096) if device.type == "cpu" else (8192, 16384)
        peak, size = matmul_peak(device, dtype, gemm_sizes)
        packed = {
            k: v.to(device) if torch.is_tensor(v) else v
            for k, v in packed_stream(doc_lengths, args.batch, args.seq_len, config.vocab_size, generator).items()
        }
        flops = TrainingFlops.of(config).of_batch(
            packed["cu_seqlens"].cpu().numpy(), int((packed["labels"] != IGNORE_INDEX).sum())
        )
        optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-4, foreach=True)

        def training_step() -> None:
            with autocast():
                loss = ours(**packed).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = side_by_side({"step": training_step}, device, args.repeats, args.warmup)["step"]
        peak, size = max((peak, size), matmul_peak(device, dtype, gemm_sizes))  # before and after: the best
        tokens = packed["input_ids"].shape[0]
        print(
            f"(d) training step (forward, backward, AdamW), {args.batch} packed rows x {args.seq_len}, "
            f"{packed['cu_seqlens'].shape[0] - 1} documents"
        )
        print(
            f"    matmul peak {peak / 1e9:,.1f} GFLOP/s ({size}^2 GEMM, {args.dtype}); step {seconds * 1e3:,.1f} ms, "
            f"{tokens / seconds:,.0f} tokens/s, {flops / seconds / 1e9:,.1f} model GFLOP/s: "
            f"MFU {flops / seconds / peak:.1%}"
        )


if __name__ == "__main__":
    main()
