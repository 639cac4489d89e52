"""StableAdamW's step under FSDP2 on 2 gloo processes: the clipping sums completed in one all-reduce
per step, against one all-reduce per parameter (the step before issue 25).

    .venv/bin/python bench/bench_optimizer.py [--layers 22] [--hidden 768] [--steps 6]

An encoder with ModernBERT-base's shape (by default) is sharded layer by layer, as training shards it,
over 2 CPU processes. Each step times ``optimizer.step()`` alone, the two ways alternating on the same
gradients and the same optimizer state layout, and the medians of rank 0 are printed with the number
of collectives each way issued (counted by torch.profiler's ``gloo:`` events on the first, untimed step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as multiprocessing
from torch.distributed.fsdp import fully_shard

from flexbert.core.model import FlexBertConfig, FlexBertForMaskedLM
from flexbert.train import optimizers
from flexbert.train.optimizers import OptimizerConfig, build_optimizer

BATCHED = optimizers._summed_over_shards


def summed_one_parameter_at_a_time(local_sums, params):
    """The baseline's reduction: every sharded parameter's sum completed by a collective of its own,
    as DTensor's ``full_tensor`` did inside the step before."""
    return [BATCHED([local_sum], [param])[0] for local_sum, param in zip(local_sums, params)]


def run_rank(rank: int, store: str, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", store=torch_dist.FileStore(store, 2), rank=rank, world_size=2)
    config = FlexBertConfig.from_dict(
        dict(
            vocab_size=50368,
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64,
            intermediate_size=args.hidden * 3 // 2,
            attn_backend="sdpa",
        )
    )
    torch.manual_seed(0)
    model = FlexBertForMaskedLM(config)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = build_optimizer(model, OptimizerConfig())
    for param in model.parameters():  # gradients of a realistic spread, without a forward pass
        param.grad = torch.randn_like(param) * 1e-3
    times, collectives = {"one per step": [], "one per parameter": []}, {}
    for step in range(args.steps + 1):
        for name in times if step % 2 else reversed(times):
            optimizers._summed_over_shards = BATCHED if name == "one per step" else summed_one_parameter_at_a_time
            torch_dist.barrier()
            if not step:  # the first step builds the optimizer state: counted, not timed
                with torch.profiler.profile() as profile:
                    optimizer.step()
                collectives[name] = sum(event.name.startswith("gloo:") for event in profile.events())
                continue
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    optimizers._summed_over_shards = BATCHED
    if rank == 0:
        results.update({name: (statistics.median(values), collectives[name]) for name, values in times.items()})
        results["parameters"] = len(list(model.parameters()))
    torch_dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22, help="encoder layers (ModernBERT-base: 22)")
    parser.add_argument("--hidden", type=int, default=768, help="hidden size (ModernBERT-base: 768)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps each way")
    args = parser.parse_args()
    results = multiprocessing.Manager().dict()
    with tempfile.TemporaryDirectory() as folder:
        multiprocessing.spawn(run_rank, args=(os.path.join(folder, "store"), args, results), nprocs=2)
    print(
        f"StableAdamW step, FSDP2 over 2 gloo processes, {args.layers} layers x {args.hidden}, "
        f"{results['parameters']} parameters (median of {args.steps}):"
    )
    baseline = results["one per parameter"][0]
    for name in ("one per parameter", "one per step"):
        seconds, count = results[name]
        print(f"  {name:>17}: {count:4d} collectives, {seconds * 1000:8.1f} ms  ({baseline / seconds:.2f}x)")


if __name__ == "__main__":
    main()
