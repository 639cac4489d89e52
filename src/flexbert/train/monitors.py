"""What a pretraining run measures besides its loss: throughput and MFU, packing, gradient norm, and
what the training loader chose (mask rate, stream proportions).

Every callback here reads the packed batch at ``Event.BATCH_END`` through what the host knows of it
(tensor shapes, ``host_cu_seqlens``, ``num_rows``, ``row_tokens``), keeps per-rank counters without
waiting for the device, and on a logged step sums them over ranks in a single all-reduce: that is
the only host synchronisation it adds.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import torch
from composer.callbacks import LRMonitor, MemoryMonitor
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torch.distributed.tensor import DTensor

from flexbert.core.model.config import FlexBertConfig
from flexbert.data.loader import PackedMLMLoader
from flexbert.train.flops import TrainingFlops, gpu_peak_flops
from flexbert.train.loggers import LoggingConfig


@functools.cache
def cpu_matmul_flops(size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of a large fp32 GEMM on this CPU: no datasheet peak applies, so measure the best the
    BLAS achieves (best of ``repeats``, after a warm-up) and take it as the CPU's peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def device_peak_flops(state: State) -> float | None:
    """Peak FLOP/s of one of this run's devices: the GPU table, a measurement on CPU, else None."""
    if state.device.name == "gpu":
        return gpu_peak_flops(torch.cuda.get_device_name())
    if state.device.name == "cpu":
        return cpu_matmul_flops()
    return None


def sum_over_ranks(state: State, values: Sequence[float | torch.Tensor]) -> list[float]:
    """Several counters summed over all ranks in one all-reduce; the host waits for it once."""
    totals = torch.stack(
        [state.device.tensor_to_device(torch.as_tensor(value, dtype=torch.float64)) for value in values]
    )
    dist.all_reduce(totals, reduce_operation="SUM")
    return totals.tolist()


def _is_logged_step(state: State, log_every: int) -> bool:
    return state.timestamp.batch.value % log_every == 0


def _sync(state: State) -> None:
    # Kernels are queued asynchronously: a clock read without a sync times the launch, not the work.
    if state.device.name == "gpu":
        torch.cuda.synchronize()


class _BatchRecord(NamedTuple):
    tokens: int
    rows: int
    flops: float
    seconds: float


class ThroughputMonitor(Callback):
    """Tokens/s, rows/s, model FLOP/s and MFU over the last ``window`` training batches.

    A batch's time runs from the previous ``BATCH_END`` (or the start of training, or the end of an
    evaluation) to its own, so data loading and checkpoint saving count against throughput and
    evaluation does not. Tokens are real tokens (``len(input_ids)``), never padding; samples are
    packed rows. MFU = achieved model FLOP/s ÷ (world size × per-device peak), the peak being
    ``peak_tflops`` when given, else :data:`GPU_PEAK_TFLOPS` or, on CPU, a measured fp32 GEMM.

    Logs ``throughput/tokens_per_sec``, ``throughput/device/tokens_per_sec``,
    ``throughput/samples_per_sec``, ``throughput/flops_per_sec`` and ``throughput/mfu`` once the
    window is full, every ``log_every`` batches.
    """

    def __init__(
        self, model_config: FlexBertConfig, peak_tflops: float | None = None, window: int = 10, log_every: int = 1
    ):
        self.flops = TrainingFlops.of(model_config)
        self.peak_flops = None if peak_tflops is None else peak_tflops * 1e12
        self.log_every = log_every
        self.history: deque[_BatchRecord] = deque(maxlen=window)
        self._clock = 0.0

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.peak_flops is None:
            self.peak_flops = device_peak_flops(state)
            if self.peak_flops is None:
                device = torch.cuda.get_device_name() if state.device.name == "gpu" else state.device.name
                warnings.warn(
                    f"no peak FLOP/s known for {device!r}, so MFU is not logged; "
                    "set logging.peak_tflops to the device's dense peak to log it"
                )
        self._restart_clock(state)

    def eval_end(self, state: State, logger: Logger) -> None:
        self._restart_clock(state)

    def _restart_clock(self, state: State) -> None:
        _sync(state)
        self._clock = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        _sync(state)
        now = time.perf_counter()
        batch = state.batch
        self.history.append(
            _BatchRecord(
                tokens=len(batch["input_ids"]),
                rows=batch["num_rows"],
                flops=self.flops.of_batch(batch["host_cu_seqlens"], batch["masked_index"].shape[0]),
                seconds=now - self._clock,
            )
        )
        self._clock = now
        if len(self.history) < self.history.maxlen or not _is_logged_step(state, self.log_every):
            return
        tokens, rows, flops, rank_seconds = sum_over_ranks(
            state,
            [
                sum(r.tokens for r in self.history),
                sum(r.rows for r in self.history),
                sum(r.flops for r in self.history),
                sum(r.seconds for r in self.history),
            ],
        )
        world = dist.get_world_size()
        seconds = rank_seconds / world  # ranks step in lockstep; their mean damps clock jitter
        metrics = {
            "throughput/tokens_per_sec": tokens / seconds,
            "throughput/device/tokens_per_sec": tokens / seconds / world,
            "throughput/samples_per_sec": rows / seconds,
            "throughput/flops_per_sec": flops / seconds,
        }
        if self.peak_flops:
            metrics["throughput/mfu"] = flops / seconds / (world * self.peak_flops)
        logger.log_metrics(metrics)


class PackingMonitor(Callback):
    """How full the packed rows are, and how large the global batch is (it grows under batch-size
    warmup).

    Logs, every ``log_every`` batches: ``packing/efficiency`` (real tokens ÷ rows × row capacity, this
    batch), ``packing/efficiency_cumulative`` (the same over every batch since training started in
    this process), ``batch/rows`` and ``batch/tokens`` (real tokens), all over every rank.
    """

    def __init__(self, log_every: int = 1):
        self.log_every = log_every
        self.real_tokens = 0
        self.capacity_tokens = 0

    def batch_end(self, state: State, logger: Logger) -> None:
        batch = state.batch
        rank_tokens, rank_rows = len(batch["input_ids"]), batch["num_rows"]
        rank_capacity = rank_rows * batch["row_tokens"]
        self.real_tokens += rank_tokens
        self.capacity_tokens += rank_capacity
        if not _is_logged_step(state, self.log_every):
            return
        tokens, rows, capacity, real_total, capacity_total = sum_over_ranks(
            state, [rank_tokens, rank_rows, rank_capacity, self.real_tokens, self.capacity_tokens]
        )
        logger.log_metrics(
            {
                "packing/efficiency": tokens / capacity,
                "packing/efficiency_cumulative": real_total / capacity_total,
                "batch/rows": int(rows),
                "batch/tokens": int(tokens),
            }
        )


def global_grad_norm(model: torch.nn.Module) -> torch.Tensor | None:
    """The L2 norm of all of the model's gradients, on its device (None when it has none). Under
    FSDP each rank holds a shard of every gradient (a DTensor): the norm is then computed over the
    shards of all ranks, a collective every rank must join."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


class GradNormMonitor(Callback):
    """The global L2 norm of the gradient as the optimizer saw it, as ``l2_norm/grad/global``.

    Composer's ``OptimizerMonitor`` logs the same figure but also one metric per parameter, each
    read with its own host sync; this computes only the global norm, with one.
    """

    def __init__(self, log_every: int = 1):
        self.log_every = log_every

    def batch_end(self, state: State, logger: Logger) -> None:
        if not _is_logged_step(state, self.log_every):
            return
        norm = global_grad_norm(state.model)
        if norm is not None:
            logger.log_metrics({"l2_norm/grad/global": norm.item()})


class LoaderMonitor(Callback):
    """What the training loader chose, which the recipe may leave to it.

    At the start, where ``train_loader.temperature`` set the stream proportions: prints them on rank
    0 as a table, and logs ``data/tokens/NAME`` and ``data/proportion/NAME``. At every step, the rate
    its batch was masked at, ``batch/mask_rate``, logged as the batch starts so that it lands in the
    step's own row of metrics.jsonl, beside its loss (callbacks at BATCH_END log into the next).
    Every rank masks at the same rate, so no rank waits for another.
    """

    def __init__(self, loader: PackedMLMLoader):
        self.loader = loader

    def fit_start(self, state: State, logger: Logger) -> None:
        mixture = self.loader.dataset.mixture
        if mixture is None:
            return
        if dist.get_global_rank() == 0:
            print(mixture.table(self.loader.path), flush=True)
        proportions = mixture.proportions
        logger.log_metrics(
            {f"data/tokens/{name}": count for name, count in mixture.tokens.items()}
            | {f"data/proportion/{name}": proportion for name, proportion in proportions.items()}
        )

    def batch_start(self, state: State, logger: Logger) -> None:
        if self.loader.mask_rate is not None:
            logger.log_metrics({"batch/mask_rate": self.loader.mask_rate})


def build_monitors(config: LoggingConfig, model_config: FlexBertConfig) -> list[Callback]:
    """The measuring callbacks of a pretraining run, as its ``logging:`` section sets them up."""
    every = config.log_every_batches()
    callbacks: list[Callback] = [
        ThroughputMonitor(model_config, config.peak_tflops, config.throughput_window, every),
        PackingMonitor(every),
        GradNormMonitor(every),
        LRMonitor(),
    ]
    if config.memory and torch.cuda.is_available():  # Composer's MemoryMonitor only warns on CPU
        callbacks.append(MemoryMonitor())
    return callbacks
