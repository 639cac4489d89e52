"""The one-shot GPU check: kernel agreement, training speed and memory, in one command.

    python bench/gpu_check.py                       # on a lent GPU node (make gpu-check)
    python bench/gpu_check.py --device cpu --smoke  # seconds on a CPU: CI keeps it from rotting

A GPU node is often offline and bare: its Python may hold only torch (2.7 or later), triton, numpy
and transformers, with neither Composer nor streaming nor flash-attn, and nothing can be installed.
So this script runs from a copy of the source tree alone (it puts ``src/`` on the path), needs no
tokenizer file and no data, and trains without Composer: the torch-only model package, our
StableAdamW and a plain loop, on synthetic documents packed by the project's own packer.

Each section is written to ``gpu_check.json`` and ``gpu_check.md`` as soon as it ends (each training
row as soon as it is measured), so a command cut off by its time limit keeps what it measured. A
section that raises is recorded as a row with its error, and the next one runs. Sections that would
not fit in what is left of ``--budget SECONDS`` are skipped, and their rows say so:

(a) agreement: every attention kernel that imports here (sdpa, flex, flash, flash3) in bf16 against
    an fp32 reference, forward and backward, on packed documents longer and shorter than the window;
(b) training: ``modernbert-base`` at 1024 tokens, 96 rows per microbatch, per kernel, with compiled
    regions off and on: tokens/s, MFU by our FLOP formula, peak memory;
(c) context extension: a few 8192-token steps (12 rows of 8192);
(d) FSDP2: the (b) steps under ``fully_shard`` on one GPU;
(e) inference (run before (d)): what ``flexbert encode`` runs (attention ``auto``, length-sorted
    unpadded batches, bf16) against transformers' ``ModernBertModel`` (sdpa, padded batches) where
    transformers imports, on the paper's four inference workloads (512 and 8192 tokens, fixed and
    variable): tokens/s and their ratio.

Training steps each take a batch of their own (fresh synthetic documents, packed on the host while
the previous step's time is already taken), as a real run would: no batch is seen twice.
``gpu_check.md`` is the table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # inference_workloads, beside this file

import numpy as np  # noqa: E402
import torch  # noqa: E402

from flexbert.core.model import DocumentLayout, FlexBertConfig, FlexBertForMaskedLM  # noqa: E402
from flexbert.core.model.registries import ATTENTION_BACKENDS  # noqa: E402
from flexbert.data.packing import GreedyPacker, Masker, MaskingConfig, collate_rows, split_document  # noqa: E402  # noqa: E402
from flexbert.train.flops import TrainingFlops, gpu_peak_flops  # noqa: E402
from flexbert.train.optimizers import OPTIMIZERS, parameter_groups  # noqa: E402

# ModernBERT's vocabulary layout: regular ids below 50280, special tokens from there on.
VOCAB, FIRST_SPECIAL, CLS, SEP, MASK = 50368, 50280, 50281, 50282, 50284
KERNEL_MODULES = {"flash": "flash_attn", "flash3": "flash_attn_interface"}


class Budget:
    """Seconds left of ``--budget``; a section starts only if its estimate fits."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s


class Report:
    """The report, written whole to ``gpu_check.json`` and ``gpu_check.md`` after every row, each file
    replaced atomically: a command killed at any moment leaves every row measured before it."""

    def __init__(self, out: Path, environment: dict):
        self.out = out
        self.data = {"environment": environment, "agreement": [], "training": [], "inference": []}
        out.mkdir(parents=True, exist_ok=True)
        print(json.dumps(environment), flush=True)
        self.save()

    def add(self, part: str, row: dict) -> None:
        self.data[part].append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def section(self, part: str, name: str, run: Callable[[], None]) -> None:
        """Run one section; an exception becomes its row, and the check goes on."""
        try:
            run()
        except Exception as err:
            traceback.print_exc()
            self.add(part, {"section": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})

    def save(self) -> None:
        for name, text in (
            ("gpu_check.json", json.dumps(self.data, indent=2) + "\n"),
            ("gpu_check.md", markdown(self.data)),
        ):
            partial = self.out / f".{name}.partial"
            partial.write_text(text)
            os.replace(partial, self.out / name)


def kernels() -> list[str]:
    """The attention kernels this machine can run, in the order they are tried."""
    found = ["sdpa", "flex"]
    for name, module in KERNEL_MODULES.items():
        if importlib.util.find_spec(module) is not None:
            found.append(name)
    return found


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- data ---------------------------------------------------------------------------------------


def packed_batches(rows: int, row_tokens: int, seed: int = 0) -> Iterator[dict]:
    """Packed MLM batches of ``rows`` rows, without end, from synthetic documents whose lengths spread
    like web text (log-normal around 400 tokens, some much longer than a row), masked at 30%."""
    rng = np.random.default_rng(seed)
    special = np.zeros(VOCAB, dtype=bool)
    special[FIRST_SPECIAL:] = True
    masker = Masker(MaskingConfig(mlm_probability=0.3), MASK, special)
    packer = GreedyPacker(row_tokens, lookahead=256)
    sample = 0
    while True:
        row_batch = []
        while len(row_batch) < rows:
            while not packer.has_full_lookahead():
                length = int(min(rng.lognormal(math.log(400), 1.0), 4 * row_tokens)) + 1
                tokens = rng.integers(0, FIRST_SPECIAL, length).astype(np.int64)
                packer.add(split_document(0, sample, tokens, row_tokens))
                sample += 1
            row_batch.append(packer.pop_row())
        yield collate_rows(row_batch, row_tokens, CLS, SEP, masker).as_dict()


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value for key, value in batch.items()
    }


# --- (a) agreement ----------------------------------------------------------------------------


def check_agreement(report: Report, device: torch.device, smoke: bool) -> None:
    heads, head_dim = (2, 16) if smoke else (12, 64)
    lengths = [300, 17, 5, 190, 1, 64] if smoke else [3000, 129, 5, 1024, 1, 700, 64, 2200, 977]
    half_window = 8 if smoke else 64
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    total = sum(lengths)
    q, k, v, grad = (torch.randn(total, heads, head_dim, generator=gen) for _ in range(4))
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    layout = DocumentLayout.from_cu_seqlens(cu.to(device), max(lengths), total)
    scale = head_dim**-0.5

    def leaves(dtype_: torch.dtype) -> list[torch.Tensor]:  # fresh copies, so that no two runs share grads
        return [x.to(device, dtype_).detach().clone().requires_grad_() for x in (q, k, v)]

    for window, causal in itertools.product((None, half_window), (False, True)):
        inputs = leaves(torch.float32)
        reference = ATTENTION_BACKENDS.get("eager")(layout, window, scale, causal=causal)(*inputs, 0.0)  # fp32
        reference.backward(grad.to(device))
        expected = [reference.detach(), *(x.grad for x in inputs)]
        for kernel in kernels():
            row = {"kernel": kernel, "window": "global" if window is None else f"local {2 * window}"}
            row["window"] += ", causal" if causal else ""
            try:
                inputs = leaves(dtype)
                out = ATTENTION_BACKENDS.get(kernel)(layout, window, scale, causal=causal)(*inputs, 0.0)
                out.backward(grad.to(device, dtype))
                actual = [out.detach(), *(x.grad for x in inputs)]
                errors = [(a.float() - e.float()).abs().max().item() for a, e in zip(actual, expected)]
                row.update(zip(("out", "dq", "dk", "dv"), errors))
                row["ok"] = max(errors) <= (1e-4 if dtype == torch.float32 else 3e-2)
            except Exception as err:  # a kernel that cannot run here is a finding, not a crash
                row.update(ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
            report.add("agreement", row)


# --- (b, c, d) training -------------------------------------------------------------------------


def model_config(kernel: str, seq_len: int, compiled: bool, smoke: bool) -> FlexBertConfig:
    sizes = (
        dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96, local_attention=16)
        if smoke
        else {}
    )
    return FlexBertConfig.from_dict(
        {
            "preset": "modernbert-base",
            **sizes,
            "attn_backend": kernel,
            "max_position_embeddings": max(seq_len, 1024),
            "global_rope_theta": 160_000.0 if seq_len > 1024 else 10_000.0,
            "local_rope_theta": 10_000.0,
            "pad_token_id": 50283,
            "cls_token_id": CLS,
            "sep_token_id": SEP,
            "compile_regions": ["mlp", "norm", "head"] if compiled else [],
        }
    )


def train_steps(
    config: FlexBertConfig, batches: Iterator[dict], device: torch.device, steps: int, warmup: int, fsdp: bool = False
) -> dict:
    """Forward, backward and StableAdamW on a new batch each step (one microbatch per step), timed
    after ``warmup`` steps; bf16 autocast on a GPU as amp_bf16 would, fp32 on a CPU."""
    torch.manual_seed(0)
    model = FlexBertForMaskedLM(config).to(device)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = OPTIMIZERS.get("stable_adamw")(parameter_groups(model, 1e-5), lr=8e-4)
    flops = TrainingFlops.of(config)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    losses, seconds, tokens, model_flops = [], 0.0, 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + steps):
        batch = to_device(next(batches), device)
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            output = model(
                batch["input_ids"],
                labels=batch["labels"],
                cu_seqlens=batch["cu_seqlens"],
                max_seqlen=batch["max_seqlen"],
                masked_index=batch["masked_index"],
                return_logits=False,
            )
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= warmup:
            seconds += time.perf_counter() - start
            tokens += batch["input_ids"].shape[0]
            model_flops += flops.of_batch(batch["host_cu_seqlens"], batch["masked_index"].shape[0])
        losses.append(output.loss.item())
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "steps": steps,
        "tokens_per_s": tokens / seconds,
        "model_tflops_per_s": model_flops / seconds / 1e12,
        "peak_memory_gib": None if peak is None else peak / 2**30,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "losses_finite": all(map(math.isfinite, losses)),
    }


def peak_flops(device: torch.device) -> float | None:
    return gpu_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def training_section(
    report: Report,
    name: str,
    device: torch.device,
    budget: Budget,
    smoke: bool,
    seq_len: int,
    rows: int,
    steps: int,
    estimate_s: float,
    compiled_options=(False, True),
    fsdp: bool = False,
) -> None:
    if smoke:
        seq_len, rows, steps = min(seq_len, 128), 2, 2
    peak = peak_flops(device)
    for kernel in kernels():
        for compiled in compiled_options:
            row = {"section": name, "kernel": kernel, "compiled": compiled, "seq_len": seq_len, "rows": rows}
            if not budget.allows(estimate_s):
                row["skipped"] = f"time budget ({budget.left():.0f} s left)"
                report.add("training", row)
                continue
            try:
                row.update(
                    train_steps(
                        model_config(kernel, seq_len, compiled, smoke),
                        packed_batches(rows, seq_len, seed=len(name)),
                        device,
                        steps,
                        warmup=1 if smoke else 3,
                        fsdp=fsdp,
                    )
                )
                if peak:
                    row["mfu"] = row["model_tflops_per_s"] * 1e12 / peak
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                traceback.print_exc()
            report.add("training", row)
            torch.cuda.empty_cache() if device.type == "cuda" else None


def fsdp_section(report: Report, device: torch.device, budget: Budget, smoke: bool) -> None:
    """One process, one GPU, so that sharding's own costs (gathering each layer's weights before it
    runs, scattering its gradients after) show against the unsharded (b)."""
    import torch.distributed as dist

    if not budget.allows(60):
        report.add("training", {"section": "fsdp2", "skipped": f"time budget ({budget.left():.0f} s left)"})
        return
    store = dist.HashStore()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
    try:
        training_section(report, "fsdp2", device, budget, smoke, 1024, 96, 20, 45, compiled_options=(False,), fsdp=True)
    finally:
        dist.destroy_process_group()


def inference_section(report: Report, device: torch.device, budget: Budget, smoke: bool) -> None:
    """(e): each workload embedded as ``flexbert encode`` embeds it (attention ``auto``, which a
    checkpoint's model is given when loaded) and, where transformers imports, by ModernBertModel on
    padded batches of as many documents as the longest fits in the same token budget; the same
    random weights, the median of three passes after a warm-up."""
    from inference_workloads import padded, workloads

    from flexbert.core.embedding import Embedder, embed_documents
    from flexbert.core.model import FlexBertForSentenceEmbedding
    from flexbert.core.model.backends import resolve_backend

    config = model_config("auto", 8192, compiled=False, smoke=smoke)
    short, long, budget_tokens = (4, 2, 512) if smoke else (512, 32, 65536)
    lengths = (64, 256) if smoke else (512, 8192)
    torch.manual_seed(0)
    model = FlexBertForSentenceEmbedding(config, pooling="mean").to(device).eval()
    ours_embedder = Embedder(Path("random"), model, None, config.max_position_embeddings, "mean")
    theirs = None
    try:
        import transformers

        from flexbert.core.hf import hf_config_from_flexbert

        hf_config = hf_config_from_flexbert(config, attn_implementation="sdpa")
        theirs = transformers.ModernBertModel(hf_config).to(device).eval()
        theirs.load_state_dict({k.removeprefix("model."): v for k, v in model.state_dict().items()})
    except ImportError:
        pass  # ours alone: its tokens/s still says what encoding costs here
    rng = np.random.default_rng(0)
    for workload in workloads(short, long, *lengths):
        row = {"section": "inference", "workload": workload.name, "kernel": resolve_backend("auto", device)}
        if not budget.allows(30):
            report.add("inference", {**row, "skipped": f"time budget ({budget.left():.0f} s left)"})
            continue
        try:
            documents = [rng.integers(5, FIRST_SPECIAL, length).astype(np.int64) for length in workload.lengths]
            row["documents"] = len(documents)
            contenders = {"ours": lambda d=documents: embed_documents(ours_embedder, d, budget_tokens, device)}
            if theirs is not None:
                per_batch = max(1, budget_tokens // int(workload.lengths.max()))
                contenders["transformers"] = padded(theirs, documents, per_batch, device)
            for name, run in contenders.items():
                run()  # warm-up: first calls allocate and compile kernels
                passes = []
                for _ in range(3):
                    synchronize(device)
                    started = time.perf_counter()
                    run()
                    synchronize(device)
                    passes.append(time.perf_counter() - started)
                row[f"{name}_tokens_per_s"] = workload.tokens / sorted(passes)[1]
            if theirs is not None:
                row["ratio"] = row["ours_tokens_per_s"] / row["transformers_tokens_per_s"]
        except Exception as err:
            traceback.print_exc()
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        report.add("inference", row)
        torch.cuda.empty_cache() if device.type == "cuda" else None


# --- report -------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"GPU check on {env['device']} (torch {env['torch']}, {env['python']}; kernels: "
        f"{', '.join(env['kernels'])}; missing: {', '.join(env['missing']) or 'none'}), {env['date']}:",
        "",
        "| section | kernel | compiled | tokens/s | MFU | peak GiB | loss first → last | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["training"]:
        speed = f"{row['tokens_per_s']:,.0f}" if "tokens_per_s" in row else "—"
        mfu = f"{row['mfu']:.1%}" if "mfu" in row else "—"
        memory = f"{row['peak_memory_gib']:.1f}" if row.get("peak_memory_gib") is not None else "—"
        loss = f"{row['first_loss']:.3f} → {row['last_loss']:.3f}" if "first_loss" in row else "—"
        note = row.get("error") or row.get("skipped") or ""
        lines.append(
            f"| {row['section']} ({row.get('rows', '')} × {row.get('seq_len', '')}) | {row.get('kernel', '')} | "
            f"{'on' if row.get('compiled') else 'off'} | {speed} | {mfu} | {memory} | {loss} | {note} |"
        )
    lines += [
        "",
        "| inference workload | kernel | documents | ours tokens/s | transformers tokens/s | ratio | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report.get("inference", []):
        ours = f"{row['ours_tokens_per_s']:,.0f}" if "ours_tokens_per_s" in row else "—"
        theirs = row.get("transformers_tokens_per_s")
        theirs = f"{theirs:,.0f}" if theirs else "—"
        ratio = f"{row['ratio']:.2f}×" if "ratio" in row else "—"
        note = (
            row.get("error")
            or row.get("skipped")
            or ("" if "ours_tokens_per_s" not in row or "ratio" in row else "no transformers")
        )
        lines.append(
            f"| {row.get('workload', row.get('section', ''))} | {row.get('kernel', '')} | "
            f"{row.get('documents', '')} | {ours} | {theirs} | {ratio} | {note} |"
        )
    lines += [
        "",
        "| agreement (bf16 vs fp32 reference) | window | max abs error out / dq / dk / dv | ok |",
        "|---|---|---|---|",
    ]
    for row in report["agreement"]:
        errors = (
            " / ".join(f"{row[k]:.1e}" for k in ("out", "dq", "dk", "dv")) if "out" in row else row.get("error", "")
        )
        ok = "yes" if row.get("ok") else "NO"
        lines.append(f"| {row.get('kernel', row.get('section', ''))} | {row.get('window', '')} | {errors} | {ok} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--budget",
        type=float,
        default=480.0,
        metavar="SECONDS",
        help="start no section that would not end within SECONDS of the start, and say so in its row "
        "(default 480: one 10-minute command with room to spare)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, few tokens: checks that the script runs")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for gpu_check.json and gpu_check.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --device cpu --smoke", file=sys.stderr)
        return 2
    budget = Budget(args.budget)
    found = kernels()
    report = Report(
        args.out,
        {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "kernels": found,
            "missing": [name for name in KERNEL_MODULES if name not in found],
            "triton": importlib.util.find_spec("triton") is not None,
            "smoke": args.smoke,
            "date": time.strftime("%Y-%m-%d"),
            "budget_s": args.budget,
            "peak_tflops": (peak_flops(device) or 0) / 1e12 or None,
        },
    )
    report.section("agreement", "agreement", lambda: check_agreement(report, device, args.smoke))
    report.section(
        "training",
        "pretraining",
        lambda: training_section(report, "pretraining", device, budget, args.smoke, 1024, 96, 30, 60),
    )
    report.section(
        "training",
        "context extension",
        lambda: training_section(
            report, "context extension", device, budget, args.smoke, 8192, 12, 5, 60, compiled_options=(True,)
        ),
    )
    # Inference before FSDP: its ratios are a goal of their own, FSDP's rows a check of (b).
    report.section("inference", "inference", lambda: inference_section(report, device, budget, args.smoke))
    report.section("training", "fsdp2", lambda: fsdp_section(report, device, budget, args.smoke))
    report.data["seconds"] = args.budget - budget.left()
    report.save()
    print(markdown(report.data))
    data = report.data
    failed = [row for row in data["agreement"] if not row.get("ok")] + [
        row for part in ("training", "inference") for row in data[part] if "error" in row
    ]
    failed += [row for row in data["training"] if row.get("losses_finite") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
