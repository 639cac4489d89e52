"""StableAdamW against a plain reference, its update clipping and decoupled decay; parameter groups; the
contract of every registered optimizer (Muon in detail: test_muon.py)."""

import copy
import math

import pytest
import torch
from conftest import tiny_config
from torch import nn

from flexbert.core.model import FlexBertForMaskedLM
from flexbert.train.optimizers import OPTIMIZERS, OptimizerConfig, StableAdamW, build_optimizer
from flexbert.typed_config import ConfigError, from_dict


def reference_stable_adamw(param, grads, lrs, *, max_lr, betas, eps, weight_decay):
    """StableAdamW step by step as in Wortsman et al. (2023), Algorithm 2, with fully decoupled decay.

    Returns the parameter after each step and the RMS of g²/v̂ at each step.
    """
    beta1, beta2 = betas
    m = torch.zeros_like(param)
    v = torch.zeros_like(param)
    params, rmss = [], []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        rms = math.sqrt((g * g / torch.clamp(v_hat, min=eps * eps)).mean().item())
        eta = lr / max(1.0, rms)
        param = param - weight_decay * (eta / max_lr) * param - eta * m_hat / (torch.sqrt(v_hat) + eps)
        params.append(param)
        rmss.append(rms)
    return params, rmss


def test_stable_adamw_matches_the_reference():
    torch.manual_seed(0)
    start = torch.randn(6, 5, dtype=torch.float64)
    grads = [torch.randn(6, 5, dtype=torch.float64) for _ in range(5)]
    grads[3] = grads[3] * 30  # a spike, so the reference also exercises the clipped branch
    lrs = [1e-2, 5e-3, 1e-2, 2.5e-3, 7.5e-3]  # as a scheduler would set them; the peak is 1e-2
    hyper = dict(betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    expected, rmss = reference_stable_adamw(start, grads, lrs, max_lr=1e-2, **hyper)
    assert max(rmss) > 1.5  # clipping really happened in this trajectory

    param = nn.Parameter(start.clone())
    optimizer = StableAdamW([param], lr=1e-2, **hyper)
    for grad, lr, want in zip(grads, lrs, expected):
        optimizer.param_groups[0]["lr"] = lr
        param.grad = grad
        optimizer.step()
        torch.testing.assert_close(param.detach(), want, atol=1e-6, rtol=0)


def test_update_clipping_limits_a_gradient_spike():
    """Quiet steps leave Adam's v̂ small; a sudden spike would then move the weights by ~lr per
    element. StableAdamW takes exactly Adam's step before the spike, and Adam's step / RMS on it."""
    torch.manual_seed(0)
    quiet = torch.randn(8, 8) * 1e-3
    spike = torch.randn(8, 8)
    stable_param = nn.Parameter(torch.zeros(8, 8))
    adam_param = nn.Parameter(torch.zeros(8, 8))
    stable = StableAdamW([stable_param], lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    adam = torch.optim.Adam([adam_param], lr=1e-2, betas=(0.9, 0.98), eps=1e-6)

    def step_both(grad):
        before = stable_param.detach().clone(), adam_param.detach().clone()
        for param, optimizer in ((stable_param, stable), (adam_param, adam)):
            param.grad = grad.clone()
            optimizer.step()
        return stable_param.detach() - before[0], adam_param.detach() - before[1]

    for _ in range(10):  # the same gradient each step: g²/v̂ == 1, nothing to clip
        stable_update, adam_update = step_both(quiet)
        torch.testing.assert_close(stable_update, adam_update, atol=1e-7, rtol=1e-5)

    stable_update, adam_update = step_both(spike)
    v_hat = stable.state[stable_param]["exp_avg_sq"] / (1 - 0.98**11)
    rms = (spike.square() / v_hat).mean().sqrt()
    assert rms > 3
    torch.testing.assert_close(stable_update, adam_update / rms, atol=1e-8, rtol=1e-5)
    assert stable_update.abs().max() < adam_update.abs().max() / 3


@pytest.mark.parametrize("name", ["stable_adamw", "decoupled_adamw"])
def test_decoupled_decay_scales_with_lr_over_peak_lr(name):
    """With zero gradients only the decay moves a weight: w ← w · (1 − wd · lr_t / max_lr)."""
    config = OptimizerConfig(name=name, lr=2e-3, weight_decay=0.01)
    layer = nn.Linear(4, 4, bias=False)
    optimizer = build_optimizer(layer, config)
    assert optimizer.param_groups[0]["initial_lr"] == 2e-3
    weight = layer.weight.detach().clone()
    for lr_ratio in (0.5, 1.0, 0.25, 0.0):  # the first step already runs below the peak, as in warmup
        optimizer.param_groups[0]["lr"] = lr_ratio * 2e-3
        layer.weight.grad = torch.zeros_like(layer.weight)
        optimizer.step()
        weight = weight * (1 - 0.01 * lr_ratio)
        torch.testing.assert_close(layer.weight.detach(), weight, atol=1e-7, rtol=1e-6)


def group_names(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return {group["weight_decay"]: {names[id(p)] for p in group["params"]} for group in optimizer.param_groups}


def test_norms_and_biases_do_not_decay_matrices_and_embeddings_do():
    model = FlexBertForMaskedLM(tiny_config())
    groups = group_names(model, build_optimizer(model, OptimizerConfig(weight_decay=1e-5)))
    assert set(groups) == {1e-5, 0.0}
    assert "model.embeddings.tok_embeddings.weight" in groups[1e-5]
    assert {"model.layers.0.attn.Wqkv.weight", "model.layers.3.mlp.Wo.weight", "head.dense.weight"} <= groups[1e-5]
    norms = {"model.final_norm.weight", "model.embeddings.norm.weight", "head.norm.weight"}
    assert {"decoder.bias", *norms} <= groups[0.0]
    assert all(p.ndim >= 2 for n, p in model.named_parameters() if n in groups[1e-5])
    assert len(groups[1e-5]) + len(groups[0.0]) == len(list(model.parameters()))

    groups = group_names(model, build_optimizer(model, OptimizerConfig(decay_embeddings=False)))
    assert "model.embeddings.tok_embeddings.weight" in groups[0.0]


def test_a_matrix_named_bias_does_not_decay():
    class WithBiasMatrix(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 3, bias=False)
            self.relative_bias = nn.Parameter(torch.zeros(3, 3))

    model = WithBiasMatrix()
    groups = group_names(model, build_optimizer(model, OptimizerConfig()))
    assert groups == {1e-5: {"proj.weight"}, 0.0: {"relative_bias"}}


@pytest.mark.parametrize("name", ["stable_adamw", "decoupled_adamw"])
def test_a_tiny_encoder_learns(name):
    torch.manual_seed(0)
    model = FlexBertForMaskedLM(tiny_config())
    input_ids = torch.randint(3, 256, (4, 32))
    labels = torch.full_like(input_ids, -100)
    masked = torch.rand(input_ids.shape) < 0.3
    labels[masked] = input_ids[masked]
    optimizer = build_optimizer(model, OptimizerConfig(name=name, lr=3e-3))
    losses = []
    for _ in range(8):
        loss = model(input_ids.masked_fill(masked, 4), torch.ones_like(input_ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", ["stable_adamw", "muon"])
def test_the_step_never_reads_a_tensor_on_the_host(monkeypatch, name):
    """On a GPU, reading a tensor's value stalls the host until the device catches up."""
    model = FlexBertForMaskedLM(tiny_config())
    optimizer = build_optimizer(model, OptimizerConfig(name=name, weight_decay=0.01))
    model(torch.randint(3, 256, (2, 16)), labels=torch.randint(3, 256, (2, 16))).loss.backward()

    def host_read(*args, **kwargs):
        raise AssertionError("host sync in the optimizer step")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, host_read)
    optimizer.step()
    monkeypatch.undo()
    assert optimizer.state[model.head.dense.weight]["step"] == 1


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        ({"name": "adam"}, "optimizer.name", "registered: decoupled_adamw, muon, stable_adamw"),
        ({"lr": 0.0}, "optimizer.lr", "must be > 0"),
        ({"betas": [0.9, 1.0]}, "optimizer.betas", "[0, 1)"),
        ({"betas": [0.9]}, "optimizer.betas", "two numbers"),
        ({"eps": 0.0}, "optimizer.eps", "must be > 0"),
        ({"weight_decay": -1e-5}, "optimizer.weight_decay", "must be >= 0"),
    ],
)
def test_config_errors_name_the_key(override, key, fragment):
    with pytest.raises(ConfigError) as err:  # as the section is built
        from_dict(OptimizerConfig, override, "optimizer")
    assert err.value.key_path == key
    assert fragment in str(err.value)


def test_registry_lists_every_optimizer():
    assert OPTIMIZERS.names() == ["decoupled_adamw", "muon", "stable_adamw"]
    from_dict(OptimizerConfig, {"name": "decoupled_adamw", "betas": [0.9, 0.95]}, "optimizer").validate()


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_registered_optimizer_moves_every_parameter_and_resumes_from_its_state(name):
    """The contract of an entry: built from a recipe's section, it moves every trainable parameter of
    a tiny encoder, and its state dict, loaded into a fresh one, continues as it would have."""
    model = FlexBertForMaskedLM(tiny_config())
    start = copy.deepcopy(model)
    config = OptimizerConfig(name=name, lr=1e-3, weight_decay=0.01)
    optimizer = build_optimizer(model, config)

    def step(model, optimizer, input_ids):
        model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step(model, optimizer, torch.randint(3, 256, (2, 24)))
    for (name, param), before in zip(model.named_parameters(), start.parameters()):
        assert not torch.equal(param, before), f"{name} did not move"
    twin = copy.deepcopy(model)
    resumed = build_optimizer(twin, config)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as a checkpoint holds it: not shared
    input_ids = torch.randint(3, 256, (2, 24))
    step(model, optimizer, input_ids)
    step(twin, resumed, input_ids)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


@torch.no_grad()
def per_parameter_stable_adamw_step(optimizer):
    """StableAdamW's step as it was before the sums were batched: each sharded parameter's
    ``sum(g²/v̂)`` completed by its own collective (DTensor's ``full_tensor``)."""
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        for param in group["params"]:
            state = optimizer.state[param]
            if not state:
                state["step"] = torch.zeros(())
                state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)
            grad = param.grad
            state["step"].add_(1)
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            m_hat = state["exp_avg"] / (1 - beta1 ** state["step"])
            v_hat = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
            ratio_sum = (grad.square() / v_hat.clamp(min=group["eps"] ** 2)).sum().full_tensor()
            lr = group["lr"] / (ratio_sum / grad.numel()).sqrt().clamp(min=1.0)
            param.mul_(1 - group["weight_decay"] * lr / group["initial_lr"])
            param.sub_(lr * m_hat / (v_hat.sqrt() + group["eps"]))


def _step_sharded_on_rank(rank: int, store_path: str, results) -> None:
    """One rank of a 2-process gloo world: a tiny encoder sharded layer by layer with FSDP2, three
    steps (the third on a spiked gradient, so that clipping acts) by StableAdamW and by the
    per-parameter reference, from the same start; records both results and each step's collectives."""
    import torch.distributed as torch_dist
    from torch.distributed.fsdp import fully_shard

    torch_dist.init_process_group("gloo", store=torch_dist.FileStore(store_path, 2), rank=rank, world_size=2)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = FlexBertForMaskedLM(tiny_config(hidden_size=40, intermediate_size=45, vocab_size=99))  # uneven shards
        for layer in model.model.layers:
            fully_shard(layer)
        models.append(fully_shard(model))
    start = {name: param.full_tensor() for name, param in models[0].named_parameters()}
    optimizers = [build_optimizer(model, OptimizerConfig(lr=1e-2, weight_decay=0.1)) for model in models]
    generator = torch.Generator().manual_seed(rank)
    counts = {"batched": [], "per_parameter": []}
    for spike in (1.0, 1.0, 50.0):
        input_ids = torch.randint(3, 99, (2, 16), generator=generator)
        for model, name in zip(models, counts):
            (spike * model(input_ids, labels=input_ids).loss).backward()
            with torch.profiler.profile() as profile:
                if name == "batched":
                    optimizers[0].step()
                else:
                    per_parameter_stable_adamw_step(optimizers[1])
            counts[name].append(sum(event.name.startswith("gloo:") for event in profile.events()))
            model.zero_grad(set_to_none=True)
    weights = [{name: param.full_tensor() for name, param in model.named_parameters()} for model in models]
    if rank == 0:
        results["same"] = all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
        results["moved"] = all(not torch.equal(weights[0][name], param) for name, param in start.items())
        results["counts"] = counts
        results["parameters"] = len(list(models[0].parameters()))
    torch_dist.destroy_process_group()


def test_stable_adamw_under_fsdp_completes_every_clipping_sum_in_one_collective(tmp_path):
    """Under FSDP2 each rank holds a shard of each gradient, so each parameter's RMS needs the
    other ranks' partial sums. The step gathers all of them in one all-reduce, not one per
    parameter, and updates the weights bitwise as completing each sum on its own did."""
    import torch.multiprocessing as multiprocessing

    results = multiprocessing.Manager().dict()
    multiprocessing.spawn(_step_sharded_on_rank, args=(str(tmp_path / "store"), results), nprocs=2)
    assert results["moved"] and results["same"]
    parameters = results["parameters"]
    assert results["counts"] == {"batched": [1, 1, 1], "per_parameter": [parameters] * 3}
