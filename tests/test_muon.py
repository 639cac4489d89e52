"""Muon: Newton–Schulz and the update against a plain float64 reference written from Jordan (2024)'s
published iteration, and against torch.optim.Muon and AdamW step by step (the newest torch: ``make
test-newest`` runs this module); which parameters it orthogonalises, exact resume, FSDP2 equal to
unsharded, its config's errors. The demo recipe trains in test_training.py."""

import copy
import math

import pytest
import torch
from conftest import tiny_config
from torch import nn

from flexbert.core.model import FlexBertForMaskedLM, FlexBertForSequenceClassification
from flexbert.train.optimizers import OPTIMIZERS, Muon, MuonConfig, OptimizerConfig, build_optimizer, newton_schulz
from flexbert.typed_config import ConfigError, from_dict

needs_torch_muon = pytest.mark.skipif(
    not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon is newer than this torch; make test-newest runs it"
)

# The encoder layers' matrices of tiny_config()'s 4 layers, by name: what Muon must step.
ENCODER_MATRICES = {
    f"model.layers.{layer}.{matrix}.weight"
    for layer in range(4)
    for matrix in ("attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo")
}


def reference_newton_schulz(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Jordan (2024)'s quintic iteration in float64: X = G / ‖G‖_F (Gᵀ for a tall G), then
    X ← a·X + b·(XXᵀ)·X + c·(XXᵀ)²·X with (a, b, c) = (3.4445, −4.7750, 2.0315)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = matrix.shape[0] > matrix.shape[1]
    x = matrix.double().T if tall else matrix.double()
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if tall else x


def reference_muon(start, grads, lrs, *, peak_lr, momentum, nesterov, weight_decay, scale):
    """Muon step by step in float64 (momentum as an average, Nesterov's look-ahead), decay fully
    decoupled; the parameter after each step."""
    param, buffer, params = start.double(), torch.zeros_like(start, dtype=torch.float64), []
    for grad, lr in zip(grads, lrs):
        grad = grad.double()
        buffer = momentum * buffer + (1 - momentum) * grad
        direction = (1 - momentum) * grad + momentum * buffer if nesterov else buffer
        param = param * (1 - weight_decay * lr / peak_lr) - lr * scale * reference_newton_schulz(direction)
        params.append(param)
    return params


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_newton_schulz_follows_the_published_iteration_and_orthogonalises(shape):
    matrix = torch.randn(shape)
    expected = reference_newton_schulz(matrix)
    torch.testing.assert_close(newton_schulz(matrix, 5, torch.float32).double(), expected, atol=2e-6, rtol=0)
    in_bfloat16 = newton_schulz(matrix, 5, torch.bfloat16).double()
    assert (in_bfloat16 - expected).norm() < 0.02 * expected.norm()
    # Singular values spread widely come out near 1 (Jordan: in about [0.7, 1.2]).
    spread = torch.linalg.svdvals(matrix)
    assert spread.max() > 3 * spread.min()
    low, high = torch.linalg.svdvals(in_bfloat16.float()).aminmax()
    assert 0.6 < low and high < 1.25


# (shape, adjust_lr, the scale of the step): Jordan's sqrt(max(1, rows/cols)), Moonlight's
# 0.2·sqrt(max(rows, cols)), Bernstein's sqrt(rows/cols).
SCALES = [
    ((24, 16), "original", math.sqrt(1.5)),
    ((16, 24), "original", 1.0),
    ((24, 16), "match_rms_adamw", 0.2 * math.sqrt(24)),
    ((16, 24), "match_rms_adamw", 0.2 * math.sqrt(24)),
    ((24, 16), "spectral_unclamped", math.sqrt(1.5)),
    ((16, 24), "spectral_unclamped", math.sqrt(16 / 24)),
]


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("shape, adjust_lr, scale", SCALES)
def test_muon_matches_the_reference(shape, adjust_lr, scale, nesterov):
    start = torch.randn(shape)
    grads = [torch.randn(shape) for _ in range(4)]
    lrs = [0.01, 0.02, 0.015, 0.005]  # as a scheduler sets them; the peak is 0.02
    settings = dict(momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    expected = reference_muon(start, grads, lrs, peak_lr=0.02, scale=scale, **settings)

    param = nn.Parameter(start.clone())
    options = MuonConfig(lr=0.02, adjust_lr=adjust_lr, ns_dtype="float32", **settings)
    optimizer = Muon([{"params": [param], "muon": True}], options=options)
    for grad, lr, want in zip(grads, lrs, expected):
        optimizer.param_groups[0]["lr"] = lr
        param.grad = grad
        optimizer.step()
        torch.testing.assert_close(param.detach().double(), want, atol=1e-6, rtol=0)


def test_in_bfloat16_the_step_stays_within_three_percent_of_the_exact_one():
    start, grad = torch.randn(32, 48), torch.randn(32, 48)
    (expected,) = reference_muon(
        start, [grad], [0.02], peak_lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, scale=1.0
    )
    param = nn.Parameter(start.clone())
    optimizer = Muon([{"params": [param], "muon": True}], options=MuonConfig(weight_decay=0.0))
    param.grad = grad
    optimizer.step()
    step, expected_step = param.detach().double() - start.double(), expected - start.double()
    assert (step - expected_step).norm() < 0.03 * expected_step.norm()


def group_names(model, optimizer) -> list[tuple[bool, float, set[str]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["muon"], g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in optimizer.param_groups]


def test_muon_steps_the_encoder_matrices_and_adamw_the_rest():
    model = FlexBertForMaskedLM(tiny_config())
    config = OptimizerConfig(name="muon", lr=1e-3, weight_decay=1e-4, muon=MuonConfig(lr=0.03, weight_decay=1e-3))
    optimizer = build_optimizer(model, config)
    (muon, muon_decay, matrices), (_, decay, decayed), (_, no_decay, undecayed) = group_names(model, optimizer)
    assert (muon, muon_decay, matrices) == (True, 1e-3, ENCODER_MATRICES)
    assert optimizer.param_groups[0]["lr"] == 0.03 and optimizer.param_groups[1]["lr"] == 1e-3
    assert (decay, decayed) == (1e-4, {"model.embeddings.tok_embeddings.weight", "head.dense.weight"})
    assert no_decay == 0.0 and {"model.final_norm.weight", "head.norm.weight", "decoder.bias"} <= undecayed
    assert len(matrices | decayed | undecayed) == len(list(model.parameters()))


def test_a_classifier_keeps_its_head_for_adamw():
    model = FlexBertForSequenceClassification(tiny_config(), num_labels=3)
    (_, _, matrices), (_, _, decayed), _ = group_names(model, build_optimizer(model, OptimizerConfig(name="muon")))
    assert matrices == ENCODER_MATRICES
    assert {"classifier.weight", "head.dense.weight"} <= decayed


def test_the_adamw_part_steps_as_torch_adamw():
    """torch's AdamW decays by λ·lr_t; the fully decoupled rate λ·peak lr is the same decay."""
    model = FlexBertForMaskedLM(tiny_config())
    twin = copy.deepcopy(model)
    ours = build_optimizer(model, OptimizerConfig(name="muon", lr=3e-3, betas=[0.9, 0.95], weight_decay=0.1 * 3e-3))
    parameters = dict(twin.named_parameters())
    decayed = [parameters.pop(name) for name in ("model.embeddings.tok_embeddings.weight", "head.dense.weight")]
    undecayed = [param for name, param in parameters.items() if name not in ENCODER_MATRICES]
    adamw = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": 0.1}, {"params": undecayed, "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.95),
        eps=1e-6,
    )
    for ratio in (0.5, 1.0, 0.25):
        ids = torch.randint(3, 256, (2, 16))
        model(ids, labels=ids).loss.backward()
        for param, copied in zip(model.parameters(), twin.parameters()):
            copied.grad = param.grad.clone()
        for group in ours.param_groups[1:] + adamw.param_groups:
            group["lr"] = ratio * 3e-3
        ours.step()
        adamw.step()
        model.zero_grad()
        for (name, param), copied in zip(model.named_parameters(), twin.parameters()):
            if name not in ENCODER_MATRICES:
                torch.testing.assert_close(param.detach(), copied.detach(), atol=1e-6, rtol=1e-5, msg=name)


@needs_torch_muon
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("shape, adjust_lr, _", SCALES)
def test_a_matrix_steps_as_with_torch_muon(shape, adjust_lr, _, nesterov):
    """torch.optim.Muon with every lr adjustment, Newton–Schulz in bfloat16 as torch computes it, its
    weight decay λ given here as λ·peak lr."""
    start = torch.randn(shape)
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    options = MuonConfig(lr=0.02, weight_decay=0.1 * 0.02, adjust_lr=adjust_lr, nesterov=nesterov)
    optimizer = Muon([{"params": [ours], "muon": True}], options=options)
    reference = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust_lr, nesterov=nesterov)
    for ratio in (0.5, 1.0, 0.7, 0.2):
        grad = torch.randn(shape)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        optimizer.param_groups[0]["lr"] = reference.param_groups[0]["lr"] = ratio * 0.02
        optimizer.step()
        reference.step()
        torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-7, rtol=1e-6)
    assert not torch.equal(ours.detach(), start)


@needs_torch_muon
def test_a_model_steps_as_with_torch_muon_and_adamw():
    """Our defaults are torch.optim.Muon's (momentum 0.95, Nesterov, 5 steps, "original" scaling)
    but for lr and the form of weight decay."""
    model = FlexBertForMaskedLM(tiny_config())
    twin = copy.deepcopy(model)
    settings = OptimizerConfig(
        name="muon", lr=3e-3, weight_decay=0.1 * 3e-3, muon=MuonConfig(lr=0.02, weight_decay=0.05 * 0.02)
    )
    ours = build_optimizer(model, settings)
    parameters = dict(twin.named_parameters())
    matrices = [parameters.pop(name) for name in sorted(ENCODER_MATRICES)]
    decayed = [parameters.pop(name) for name in ("model.embeddings.tok_embeddings.weight", "head.dense.weight")]
    muon = torch.optim.Muon(matrices, lr=0.02, weight_decay=0.05)
    adamw = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": 0.1}, {"params": list(parameters.values()), "weight_decay": 0.0}],
        lr=3e-3,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    groups = ours.param_groups + muon.param_groups + adamw.param_groups
    peaks = [group["lr"] for group in groups]
    for ratio in (0.5, 1.0, 0.7):
        ids = torch.randint(3, 256, (2, 16))
        model(ids, labels=ids).loss.backward()
        for param, copied in zip(model.parameters(), twin.parameters()):
            copied.grad = param.grad.clone()
        for group, peak in zip(groups, peaks):
            group["lr"] = ratio * peak
        for optimizer in (ours, muon, adamw):
            optimizer.step()
            optimizer.zero_grad()
        model.zero_grad()
        for (name, param), copied in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(param.detach(), copied.detach(), atol=1e-6, rtol=1e-5, msg=name)


def train_steps(model, optimizer, batches) -> None:
    for ids, lr_ratio in batches:
        for group in optimizer.param_groups:
            group["lr"] = lr_ratio * group["initial_lr"]
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_resuming_from_the_optimizer_state_continues_bitwise(tmp_path):
    settings = OptimizerConfig(name="muon", lr=3e-3, weight_decay=1e-4, muon=MuonConfig(weight_decay=1e-3))
    batches = [(torch.randint(3, 256, (2, 16)), ratio) for ratio in (0.25, 0.5, 1.0, 0.8, 0.6)]
    model = FlexBertForMaskedLM(tiny_config())
    start = copy.deepcopy(model.state_dict())
    uninterrupted = build_optimizer(model, settings)
    train_steps(model, uninterrupted, batches)

    first = FlexBertForMaskedLM(tiny_config())
    first.load_state_dict(start)
    optimizer = build_optimizer(first, settings)
    train_steps(first, optimizer, batches[:2])
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "checkpoint.pt")
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.manual_seed(1)  # a fresh model, initialised otherwise
    resumed = FlexBertForMaskedLM(tiny_config())
    resumed.load_state_dict(saved["model"])
    optimizer = build_optimizer(resumed, settings)
    optimizer.load_state_dict(saved["optimizer"])
    train_steps(resumed, optimizer, batches[2:])

    for (name, expected), actual in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(actual, expected), name
    buffers = [(uninterrupted.state[p], optimizer.state[q]) for p, q in zip(model.parameters(), resumed.parameters())]
    assert all(torch.equal(a[key], b[key]) for a, b in buffers for key in a)
    assert "momentum_buffer" in optimizer.state[resumed.model.layers[0].attn.Wqkv.weight]


def _step_sharded_and_whole_on_rank(rank: int, store_path: str, results) -> None:
    """One rank of a 2-process gloo world: a tiny encoder sharded layer by layer with FSDP2 and its
    unsharded copy, stepped by Muon three times with the same gradients (the sharded run's,
    gathered); records whether the weights stayed bitwise equal."""
    import torch.distributed as torch_dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch_dist.init_process_group("gloo", store=torch_dist.FileStore(store_path, 2), rank=rank, world_size=2)
    torch.manual_seed(0)
    # A plain MLP, whose Wi has 45 rows: shards of 23 and 22 rows.
    sharded = FlexBertForMaskedLM(
        tiny_config(hidden_size=40, intermediate_size=45, vocab_size=99, blocks={"mlp": "mlp"})
    )
    whole = copy.deepcopy(sharded)
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    settings = OptimizerConfig(name="muon", lr=1e-2, weight_decay=0.1, muon=MuonConfig(weight_decay=0.01))
    optimizers = [build_optimizer(model, settings) for model in (sharded, whole)]
    generator = torch.Generator().manual_seed(rank)
    same = []
    for _ in range(3):
        input_ids = torch.randint(3, 99, (2, 16), generator=generator)
        sharded(input_ids, labels=input_ids).loss.backward()
        for param, copied in zip(sharded.parameters(), whole.parameters()):
            copied.grad = param.grad.full_tensor()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        same.append(all(torch.equal(p.full_tensor(), q) for p, q in zip(sharded.parameters(), whole.parameters())))
    matrices = optimizers[0].param_groups[0]["params"]
    if rank == 0:
        results["same"] = same
        results["sharded matrices"] = sum(isinstance(p, DTensor) for p in matrices), len(matrices)
        results["uneven"] = tuple(sharded.model.layers[0].mlp.Wi.weight.to_local().shape)
    torch_dist.destroy_process_group()


def test_under_fsdp2_muon_updates_the_weights_bitwise_as_unsharded(tmp_path):
    import torch.multiprocessing as multiprocessing

    results = multiprocessing.Manager().dict()
    multiprocessing.spawn(_step_sharded_and_whole_on_rank, args=(str(tmp_path / "store"), results), nprocs=2)
    assert results["same"] == [True, True, True]
    assert results["sharded matrices"] == (16, 16) and results["uneven"] == (23, 40)


@pytest.mark.parametrize(
    "section, key, fragment",
    [
        ({"name": "stable_adamw", "muon": {}}, "optimizer.muon", "only the muon optimizer reads this section"),
        ({"muon": {"lr": 0.0}}, "optimizer.muon.lr", "must be > 0"),
        ({"muon": {"momentum": 1.0}}, "optimizer.muon.momentum", "[0, 1)"),
        ({"muon": {"ns_steps": 0}}, "optimizer.muon.ns_steps", "at least 1"),
        ({"muon": {"weight_decay": -0.1}}, "optimizer.muon.weight_decay", "must be >= 0"),
        ({"muon": {"adjust_lr": "moonlight"}}, "optimizer.muon.adjust_lr", "original, match_rms_adamw, spectral_"),
        ({"muon": {"ns_dtype": "float16"}}, "optimizer.muon.ns_dtype", "must be one of bfloat16, float32"),
        ({"muon": {"nesterov": "yes"}}, "optimizer.muon.nesterov", "expected a boolean"),
        ({"muon": {"momentun": 0.9}}, "optimizer.muon.momentun", "did you mean 'momentum'"),
    ],
)
def test_config_errors_name_the_key(section, key, fragment):
    with pytest.raises(ConfigError) as err:
        from_dict(OptimizerConfig, {"name": "muon", **section}, "optimizer")
    assert err.value.key_path == key
    assert fragment in str(err.value)


def test_a_recipe_picks_muon_by_name_with_its_options_or_their_defaults():
    config = from_dict(OptimizerConfig, {"name": "muon", "muon": {"lr": 0.01, "adjust_lr": "match_rms_adamw"}}, "o")
    assert config.muon == MuonConfig(lr=0.01, adjust_lr="match_rms_adamw")
    model = FlexBertForMaskedLM(tiny_config())
    assert build_optimizer(model, config).param_groups[0]["adjust_lr"] == "match_rms_adamw"
    defaults = build_optimizer(model, from_dict(OptimizerConfig, {"name": "muon"}, "o")).param_groups[0]
    assert {key: defaults[key] for key in vars(MuonConfig())} == vars(MuonConfig())
    assert "Options: lr, momentum, nesterov" in {e.name: e.description for e in OPTIMIZERS.entries()}["muon"]


def test_muon_on_a_model_without_encoder_matrices_names_the_problem():
    """A model of vectors only (here a norm) gives Muon nothing to orthogonalise."""
    with pytest.raises(ConfigError) as err:
        build_optimizer(nn.LayerNorm(8), OptimizerConfig(name="muon"))
    assert err.value.key_path == "optimizer.name"
    assert "no trainable one" in str(err.value) and "\n" not in str(err.value)


def test_a_muon_group_of_vectors_is_refused():
    with pytest.raises(ValueError, match=r"matrices only; its group holds a tensor of shape \(8,\)"):
        Muon([{"params": [nn.Parameter(torch.zeros(8))], "muon": True}])
