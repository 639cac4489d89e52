"""Model merging (`flexbert merge`): linear and TIES against the paper's algorithm written out here
entry by entry, a merge worked by hand, and a merged checkpoint that exports to transformers."""

from __future__ import annotations

import dataclasses
import random
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers
from conftest import TOKENIZER, tiny_config

from flexbert.cli import main as cli_main
from flexbert.core.checkpoint import COMPOSER_MODEL_PREFIX, MODEL_CONFIG_KEY, read_weights, write_weights
from flexbert.core.model import FlexBertForMaskedLM
from flexbert.core.tokenizer import load_tokenizer
from flexbert.errors import CheckpointError
from flexbert.train.merging import MergeError, merge_checkpoints, merge_weights, task_vector_merger

# --- the paper's algorithm, written independently: one flat vector, entry by entry -------------------


def paper_ties(
    base: list[float], models: list[list[float]], density: float, scale: float
) -> tuple[list[float], list[list[float]]]:
    """TIES-Merging as Algorithm 1 of Yadav et al. (2023) states it, on one flat vector: the merged
    vector, and each model's trimmed task vector. Trimming keeps round(density * n) entries (at least
    one) and every entry tied in magnitude with the smallest of them."""
    n = len(base)
    keep = max(1, round(density * n))
    trimmed = []
    for model in models:
        task_vector = [theta - origin for theta, origin in zip(model, base)]
        smallest_kept = sorted((abs(value) for value in task_vector), reverse=True)[keep - 1]
        trimmed.append([value if abs(value) >= smallest_kept else 0.0 for value in task_vector])
    merged = []
    for p in range(n):
        mass = sum(vector[p] for vector in trimmed)
        agreeing = [vector[p] for vector in trimmed if (mass > 0 and vector[p] > 0) or (mass < 0 and vector[p] < 0)]
        disjoint_mean = sum(agreeing) / len(agreeing) if agreeing else 0.0
        merged.append(base[p] + scale * disjoint_mean)
    return merged, trimmed


def paper_linear(base: list[float], models: list[list[float]], weights: list[float], scale: float) -> list[float]:
    return [
        origin + scale * sum(weight * (model[p] - origin) for weight, model in zip(weights, models))
        for p, origin in enumerate(base)
    ]


def flat(tensor: torch.Tensor) -> list[float]:
    return tensor.double().flatten().tolist()


# --- a merge worked by hand ---------------------------------------------------------------------------

# One tensor of 6 entries (2 x 3: trimming ranks the whole tensor, not each row), 3 checkpoints, on a
# grid of sixteenths, so that every sum below is exact.
HAND_BASE = [[0.5, -1.0, 2.0], [0.0, 1.0, -0.5]]
HAND_MODELS = [
    [[1.0, -1.125, 2.375], [-0.25, 1.0, 0.125]],  # task vector  0.5   -0.125  0.375 -0.25  0      0.625
    [[-0.25, -0.75, 1.625], [0.125, 1.0625, -0.75]],  # task vector -0.75   0.25  -0.375  0.125  0.0625 -0.25
    [[0.625, -1.5, 2.0], [0.125, 1.0625, 0.0]],  # task vector  0.125 -0.5    0      0.125  0.0625  0.5
]


def hand_merge(method: str, **options) -> list[float]:
    base = {"w": torch.tensor(HAND_BASE)}
    models = [{"w": torch.tensor(model)} for model in HAND_MODELS]
    return merge_weights(base, models, task_vector_merger(method, len(models), **options))["w"].flatten().tolist()


def test_ties_worked_by_hand():
    # --density 0.5 keeps round(0.5 * 6) = 3 entries of each task vector, and any tied with the third:
    #   1: |0.5 0.125 0.375 0.25 0 0.625|, third largest 0.375  ->  0.5   0     0.375  0     0  0.625
    #   2: third largest 0.25, held by two entries (a tie): 4 kept -> -0.75  0.25 -0.375  0     0 -0.25
    #   3: third largest 0.125, held by two entries: 4 kept         ->  0.125 -0.5  0      0.125 0  0.5
    # Elected signs (the sign of each column's sum):
    #   -0.125 -> -   (two of three are positive, but the mass is negative)
    #   -0.25  -> -
    #    0     -> 0   (0.375 and -0.375 cancel: the entry stays at the base)
    #    0.125 -> +
    #    0     -> 0   (every trimmed value is 0)
    #    0.875 -> +
    # Disjoint means (of the values of the elected sign): -0.75, -0.5, 0, 0.125, 0, (0.625 + 0.5) / 2 = 0.5625.
    # The base plus that: 0.5-0.75, -1-0.5, 2+0, 0+0.125, 1+0, -0.5+0.5625.
    assert hand_merge("ties", density=0.5) == [-0.25, -1.5, 2.0, 0.125, 1.0, 0.0625]
    # --scale 2 adds twice the merged task vector: 0.5-1.5, -1-1, 2, 0.25, 1, -0.5+1.125.
    assert hand_merge("ties", density=0.5, scale=2.0) == [-1.0, -2.0, 2.0, 0.25, 1.0, 0.625]
    # --density 1 trims nothing. Column sums: -0.125, -0.375, 0, 0 (-0.25 + 0.125 + 0.125), 0.125, 0.875;
    # disjoint means: -0.75, (-0.125 - 0.5) / 2 = -0.3125, 0, 0, (0.0625 + 0.0625) / 2 = 0.0625, 0.5625.
    assert hand_merge("ties", density=1.0) == [-0.25, -1.3125, 2.0, 0.0, 1.0625, 0.0625]


def test_linear_worked_by_hand():
    # 0.5 * task vector 1 + 0.25 * (2 + 3):
    #   0.25-0.1875+0.03125, -0.0625+0.0625-0.125, 0.1875-0.09375, -0.125+0.03125+0.03125,
    #   0.015625+0.015625, 0.3125-0.0625+0.125
    # = 0.09375, -0.125, 0.09375, -0.0625, 0.03125, 0.375; plus the base:
    assert hand_merge("linear", weights=[0.5, 0.25, 0.25]) == [0.59375, -1.125, 2.09375, -0.0625, 1.03125, -0.125]


# --- random state dicts against the reference ---------------------------------------------------------

SHAPES = {"embedding": (7, 5), "norm": (6,), "projection": (3, 2, 4), "scalar": (), "half": (9,)}


def random_state_dicts(rng: random.Random, count: int) -> tuple[dict, list[dict]]:
    """A base and ``count`` models on a grid of sixteenths (exact sums, magnitudes often tied), whose
    task vectors have zeros and both signs; one tensor is bfloat16, and an integer buffer is shared."""
    base, models = {}, [{} for _ in range(count)]
    for name, shape in SHAPES.items():
        dtype = torch.bfloat16 if name == "half" else torch.float32
        numel = max(1, torch.Size(shape).numel())
        base[name] = torch.tensor([rng.randint(-16, 16) / 8 for _ in range(numel)], dtype=dtype).reshape(shape)
        for model in models:
            change = torch.tensor([rng.choice([0, 0, *range(-6, 7)]) / 16 for _ in range(numel)]).reshape(shape)
            model[name] = (base[name].double() + change).to(dtype)
    for model in [base, *models]:
        model["positions"] = torch.arange(4)
    return base, models


def test_ties_matches_the_paper_on_random_state_dicts():
    seen = {"kept past a tie": 0, "signs disagree": 0, "all trimmed to 0": 0, "signs cancel": 0}
    for seed in range(8):
        rng = random.Random(seed)
        count, density = rng.choice([2, 3, 5]), rng.choice([0.1, 0.2, 0.5, 0.7, 1.0])
        scale = rng.choice([1.0, 0.5, 1.5])
        base, models = random_state_dicts(rng, count)
        merged = merge_weights(base, models, task_vector_merger("ties", count, density=density, scale=scale))
        for name, tensor in base.items():
            assert merged[name].dtype == tensor.dtype and merged[name].shape == tensor.shape
            if not tensor.is_floating_point():
                assert torch.equal(merged[name], tensor)
                continue
            expected, trimmed = paper_ties(flat(tensor), [flat(model[name]) for model in models], density, scale)
            torch.testing.assert_close(merged[name], torch.tensor(expected).reshape(tensor.shape).to(tensor.dtype))
            keep = max(1, round(density * len(expected)))
            seen["kept past a tie"] += sum(sum(value != 0 for value in vector) > keep for vector in trimmed)
            for column in zip(*trimmed):
                seen["signs disagree"] += min(column) < 0 < max(column)
                seen["all trimmed to 0"] += not any(column)
                seen["signs cancel"] += any(column) and sum(column) == 0
    # The cases that set TIES apart from a mean, and a tie in magnitude at the threshold, all occurred.
    assert all(seen.values()), seen


@pytest.mark.parametrize("seed", range(3))
def test_linear_matches_the_weighted_sum_of_task_vectors(seed):
    rng = random.Random(100 + seed)
    count = rng.choice([2, 3, 4])
    weights, scale = [rng.uniform(-1, 2) for _ in range(count)], rng.choice([1.0, 0.3])
    base, models = random_state_dicts(rng, count)
    merged = merge_weights(base, models, task_vector_merger("linear", count, weights=weights, scale=scale))
    for name in SHAPES:
        expected = paper_linear(flat(base[name]), [flat(model[name]) for model in models], weights, scale)
        torch.testing.assert_close(merged[name], torch.tensor(expected).reshape(base[name].shape).to(base[name].dtype))


def test_linear_with_the_default_weights_is_the_mean_whatever_the_base():
    base, models = random_state_dicts(random.Random(7), 3)
    merged = merge_weights(base, models, task_vector_merger("linear", 3))
    for name in SHAPES:
        mean = sum(model[name].double() for model in models) / 3
        torch.testing.assert_close(merged[name], mean.to(base[name].dtype))


def test_options_that_do_not_fit_the_method_stop_with_one_line():
    for arguments, message in [
        (("slerp", 2), "unknown merge method 'slerp': choose linear or ties"),
        (("ties", 2, None, 0.0), "--density 0.0: the fraction of each task vector kept must lie in (0, 1]"),
        (("ties", 2, None, 1.5), "--density 1.5: the fraction of each task vector kept must lie in (0, 1]"),
        (("ties", 2, [0.5, 0.5]), "--weights is for --method linear"),
        (("linear", 2, None, 0.2), "--density is for --method ties"),
        (("linear", 3, [0.5, 0.5]), "--weights gives 2 weights for 3 checkpoints; give one per checkpoint"),
        (("linear", 2, [0.5, float("nan")]), "every weight must be a finite number"),
        (("ties", 2, None, None, float("inf")), "--scale inf: the scale of the merged task vector must be a finite"),
    ]:
        with pytest.raises(MergeError) as raised:
            task_vector_merger(*arguments)
        assert message in str(raised.value) and "\n" not in str(raised.value)


def test_an_integer_tensor_is_the_base_s_and_must_be_equal_everywhere(tmp_path):
    base, models = random_state_dicts(random.Random(3), 2)
    paths = []
    for i, weights in enumerate([base, *models]):
        paths.append(tmp_path / f"{i}.pt")
        write_weights(paths[-1], weights)
    merged = merge_checkpoints(paths[0], paths[1:], task_vector_merger("ties", 2))
    assert torch.equal(merged["positions"], base["positions"])
    write_weights(paths[2], {**models[1], "positions": torch.arange(4) + 1})
    with pytest.raises(CheckpointError, match=f"^{paths[2]} and {paths[0]} differ in positions, a torch.int64 tensor"):
        merge_checkpoints(paths[0], paths[1:], task_vector_merger("ties", 2))


# --- the command ---------------------------------------------------------------------------------------


def tiny_mlm(hidden_size: int = 32) -> FlexBertForMaskedLM:
    """A two-layer model with ModernBERT's tokenizer, freshly initialised: merging needs no training."""
    tokenizer = load_tokenizer(TOKENIZER)
    config = tiny_config(
        vocab_size=50368,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_id,
        cls_token_id=tokenizer.cls_id,
        sep_token_id=tokenizer.sep_id,
    )
    return FlexBertForMaskedLM(config)


def write_sharded(folder: Path, weights: dict[str, torch.Tensor]) -> Path:
    """``weights`` as a folder of DCP shards, keyed as Composer's FSDP checkpoints are."""
    state = {"state": {"model": {COMPOSER_MODEL_PREFIX + name: tensor.clone() for name, tensor in weights.items()}}}
    with warnings.catch_warnings():  # one process, no process group: DCP says it assumes so
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A base and a whole-file checkpoint, carrying their model config (as average and import-hf write
    them), and a sharded checkpoint; the latter two are the base moved by their own noise."""
    root = tmp_path_factory.mktemp("merging")
    torch.manual_seed(0)
    model = tiny_mlm()
    base = model.state_dict()
    config = {MODEL_CONFIG_KEY: dataclasses.asdict(model.config)}
    write_weights(root / "base.pt", base, **config)
    moved = [{name: tensor + 0.01 * torch.randn_like(tensor) for name, tensor in base.items()} for _ in range(2)]
    for weights in moved:  # the decoder is the token embeddings, under a second name
        weights["decoder.weight"] = weights["model.embeddings.tok_embeddings.weight"]
    write_weights(root / "first.pt", moved[0], **config)
    write_sharded(root / "second", moved[1])
    return {"base": root / "base.pt", "first": root / "first.pt", "second": root / "second"}


def test_a_ties_merge_of_a_file_and_shards_exports_to_transformers(checkpoints, tmp_path, capsys):
    out = tmp_path / "merged.pt"
    names = [str(checkpoints["first"]), str(checkpoints["second"])]
    argv = ["merge", "--method", "ties", "--density", "0.3", "--scale", "0.8", "--base", str(checkpoints["base"])]
    assert cli_main([*argv, *names, "--out", str(out)]) == 0
    assert (
        capsys.readouterr().out.splitlines()[0]
        == f"{out}: the ties merge of {', '.join(names)} onto {checkpoints['base']}"
    )

    merged, extras = read_weights(out)
    base = read_weights(checkpoints["base"])[0]
    models = [read_weights(checkpoints[name])[0] for name in ("first", "second")]
    for name in ("head.norm.weight", "model.layers.1.attn.Wo.weight"):  # small enough for the reference's loops
        expected, _ = paper_ties(flat(base[name]), [flat(model[name]) for model in models], 0.3, 0.8)
        torch.testing.assert_close(merged[name], torch.tensor(expected, dtype=torch.float32).reshape(base[name].shape))
    assert torch.equal(merged["decoder.weight"], merged["model.embeddings.tok_embeddings.weight"])
    assert extras[MODEL_CONFIG_KEY]["hidden_size"] == 32  # the base's config: it exports alone

    assert cli_main(["export-hf", str(out), str(tmp_path / "hf"), "--tokenizer", str(TOKENIZER)]) == 0
    hf_model = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(
        hf_model.model.embeddings.tok_embeddings.weight, merged["model.embeddings.tok_embeddings.weight"]
    )
    torch.testing.assert_close(hf_model.model.layers[1].attn.Wo.weight, merged["model.layers.1.attn.Wo.weight"])


def test_a_linear_merge_with_default_weights_writes_the_average(checkpoints, tmp_path):
    names = [str(checkpoints["first"]), str(checkpoints["second"])]
    merged_out, averaged_out = tmp_path / "merged.pt", tmp_path / "averaged.pt"
    assert (
        cli_main(["merge", "--method", "linear", "--base", str(checkpoints["base"]), *names, "--out", str(merged_out)])
        == 0
    )
    assert cli_main(["average", *names, "--out", str(averaged_out)]) == 0
    merged, averaged = read_weights(merged_out)[0], read_weights(averaged_out)[0]
    for name in merged:
        torch.testing.assert_close(merged[name], averaged[name])


def test_bad_merges_stop_with_one_line_and_write_nothing(checkpoints, tmp_path, capsys):
    base, first, second = (str(checkpoints[name]) for name in ("base", "first", "second"))
    wider = tmp_path / "wider.pt"
    write_weights(wider, tiny_mlm(hidden_size=64).state_dict())
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    missing = str(tmp_path / "missing.pt")
    out = tmp_path / "never.pt"
    ties = ["--method", "ties"]
    for arguments, message in [
        (
            [*ties, "--base", base, first, str(wider)],
            f"{wider} and {base} hold different architectures: "
            "model.embeddings.tok_embeddings.weight is (50368, 64) in one and (50368, 32) in the other",
        ),
        ([*ties, "--base", missing, first], f"checkpoint not found: {missing}"),
        ([*ties, "--base", str(junk), first], f"{junk} is not a readable Composer checkpoint ("),
        ([*ties, "--base", base, first, missing], f"checkpoint not found: {missing}"),
        ([*ties, "--density", "0", "--base", base, first], "--density 0.0: the fraction of each task vector kept"),
        ([*ties, "--density", "1.2", "--base", base, first], "must lie in (0, 1]"),
        (
            ["--method", "linear", "--weights", "1,2,3", "--base", base, first, second],
            "--weights gives 3 weights for 2",
        ),
        (["--method", "slerp", "--base", base, first], "unknown merge method 'slerp': choose linear or ties"),
    ]:
        assert cli_main(["merge", *arguments, "--out", str(out)]) == 2, arguments
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith("flexbert: error: ") and message in error, error
        assert not out.exists()
    out.write_bytes(b"kept")
    assert cli_main(["merge", *ties, "--base", base, first, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"flexbert: error: output {out} already exists; use --overwrite to replace it\n"
    assert out.read_bytes() == b"kept"
    assert cli_main(["merge", *ties, "--base", base, first, "--out", str(out), "--overwrite"]) == 0
    assert read_weights(out)[0].keys() == read_weights(base)[0].keys()
