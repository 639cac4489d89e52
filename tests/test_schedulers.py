"""Warmup-stable-decay schedules in tokens, batches and fractions of the run; config errors."""

import math
from types import SimpleNamespace

import pytest
import torch
from composer.core import State, Time, Timestamp
from composer.devices import DeviceCPU
from composer.optim import compile_composer_scheduler

from flexbert.train.optimizers import OptimizerConfig, build_optimizer
from flexbert.train.schedulers import SCHEDULERS, SchedulerConfig, build_scheduler
from flexbert.typed_config import ConfigError, from_dict


def at(max_duration, batch=0, token=0):
    """The two fields of Composer's State that a scheduler reads."""
    return SimpleNamespace(
        timestamp=Timestamp(batch=batch, token=token), max_duration=Time.from_timestring(max_duration)
    )


def schedule(**config):
    config = from_dict(SchedulerConfig, config, "scheduler")
    config.validate()
    return build_scheduler(config)


def test_linear_warmup_in_tokens_then_constant():
    # ModernBERT-base phase 1: 3B tokens of warmup, with digit-grouping underscores.
    scheduler = schedule(name="constant_with_warmup", warmup="3_000_000_000tok")
    run = "1_719_000_000_000tok".replace("_", "")
    assert scheduler(at(run, token=0)) == 0.0
    assert scheduler(at(run, token=750_000_000)) == pytest.approx(0.25)
    assert scheduler(at(run, token=2_999_999_999)) == pytest.approx(1.0, abs=1e-9)
    assert scheduler(at(run, token=3_000_000_000)) == 1.0
    assert scheduler(at(run, token=1_719_000_000_000)) == 1.0  # never decays


def test_warmup_stable_decay_in_batches():
    scheduler = schedule(warmup="100ba", decay="200ba", decay_shape="linear", final_lr_ratio=0.1)
    expected = {0: 0.0, 50: 0.5, 100: 1.0, 500: 1.0, 800: 1.0, 850: 0.1 + 0.9 * 0.75, 900: 0.55, 1000: 0.1, 1200: 0.1}
    for batch, multiplier in expected.items():
        assert scheduler(at("1000ba", batch=batch)) == pytest.approx(multiplier), batch


@pytest.mark.parametrize(
    "shape, curve",
    [
        ("linear", lambda p: 1 - p),
        ("cosine", lambda p: (1 + math.cos(math.pi * p)) / 2),
        ("1-sqrt", lambda p: 1 - math.sqrt(p)),
    ],
)
def test_decay_shapes(shape, curve):
    # Phase 2b: the whole run decays to 0.001 x peak.
    final = 0.001
    scheduler = schedule(decay="1dur", decay_shape=shape, final_lr_ratio=final)
    for token in (0, 1_000, 2_500, 5_000, 9_000, 10_000):
        want = final + (1 - final) * curve(token / 10_000)
        assert scheduler(at("10000tok", token=token)) == pytest.approx(want, rel=1e-12), token


def test_one_minus_sqrt_falls_fastest_early():
    values = {
        shape: schedule(decay="100ba", decay_shape=shape)(at("100ba", batch=10))
        for shape in ("linear", "cosine", "1-sqrt")
    }
    assert values["1-sqrt"] == pytest.approx(1 - math.sqrt(0.1))
    assert values["1-sqrt"] < values["linear"] < values["cosine"]


def test_fractions_of_the_run_resolve_against_max_duration():
    scheduler = schedule(warmup="0.1dur", decay="0.2dur", decay_shape="linear")
    assert scheduler(at("2000ba", batch=50)) == pytest.approx(0.25)  # warmup is 200 batches
    assert scheduler(at("2000ba", batch=1600)) == 1.0  # the decay starts at batch 1600
    assert scheduler(at("2000ba", batch=1800)) == pytest.approx(0.5)
    assert scheduler(at("10000tok", token=9000)) == pytest.approx(0.5)  # the same config, in tokens


def test_warmup_and_decay_may_count_different_units():
    scheduler = schedule(warmup="1_000tok", decay="10ba", decay_shape="linear")
    assert scheduler(at("100ba", batch=1, token=500)) == pytest.approx(0.5)
    assert scheduler(at("100ba", batch=95, token=95_000)) == pytest.approx(0.5)


def test_zero_decay_is_constant_with_warmup():
    for decay in ("0tok", "0ba", "0dur"):
        scheduler = schedule(warmup="10ba", decay=decay)
        assert scheduler(at("100ba", batch=5)) == pytest.approx(0.5)
        assert scheduler(at("100ba", batch=100)) == 1.0


def test_decay_needs_max_duration_in_its_unit():
    scheduler = schedule(decay="1_000tok")
    with pytest.raises(ValueError, match="max_duration=100ba is not counted in tok"):
        scheduler(at("100ba", batch=50))
    with pytest.raises(ValueError, match="longer than the run"):
        scheduler(at("500tok", token=50))


def test_scale_schedule_ratio_stretches_absolute_lengths():
    scheduler = schedule(warmup="100ba", decay="100ba", decay_shape="linear")
    # Composer scales max_duration itself (1000ba -> 2000ba at ssr 2); the scheduler scales its lengths.
    assert scheduler(at("2000ba", batch=100), ssr=2.0) == pytest.approx(0.5)
    assert scheduler(at("2000ba", batch=1900), ssr=2.0) == pytest.approx(0.5)


def test_drives_the_optimizer_through_composer():
    """Composer turns the schedule into a LambdaLR that multiplies each group's initial lr."""
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-3))
    state = State(
        model=model, rank_zero_seed=0, run_name="test", device=DeviceCPU(), max_duration="100ba", optimizers=optimizer
    )
    lr_scheduler = compile_composer_scheduler(schedule(warmup="10ba", decay="50ba", decay_shape="linear"), state)
    assert [group["lr"] for group in optimizer.param_groups] == [0.0, 0.0]
    for batch, lr in ((5, 5e-4), (50, 1e-3), (75, 5e-4)):
        state.timestamp = Timestamp(batch=batch)
        optimizer.step()  # as in training: a step at the current lr, then the next lr
        lr_scheduler.step()
        assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([lr, lr])
        assert [group["initial_lr"] for group in optimizer.param_groups] == [1e-3, 1e-3]


@pytest.mark.parametrize(
    "config, key, fragment",
    [
        ({"name": "cosine"}, "scheduler.name", "registered: constant_with_warmup, warmup_stable_decay"),
        ({"warmup": "abc"}, "scheduler.warmup", "Invalid time string"),
        ({"warmup": "1.5ba"}, "scheduler.warmup", "integer"),
        ({"warmup": "-5ba"}, "scheduler.warmup", "negative"),
        ({"warmup": "2ep"}, "scheduler.warmup", "give lengths in tok, sp, ba, dur"),
        ({"decay": "1.5dur"}, "scheduler.decay", "longer than the run"),
        ({"warmup": "0.5dur", "decay": "0.6dur"}, "scheduler.decay", "overlap"),
        ({"name": "constant_with_warmup", "decay": "10ba"}, "scheduler.decay", "never decays"),
        ({"decay_shape": "exp"}, "scheduler.decay_shape", "choose from linear, cosine, 1-sqrt"),
        ({"final_lr_ratio": -0.1}, "scheduler.final_lr_ratio", "[0, 1]"),
    ],
)
def test_config_errors_name_the_key(config, key, fragment):
    with pytest.raises(ConfigError) as err:
        from_dict(SchedulerConfig, config, "scheduler").validate()
    assert err.value.key_path == key
    assert fragment in str(err.value)


def test_registry_lists_both_schedules():
    assert SCHEDULERS.names() == ["constant_with_warmup", "warmup_stable_decay"]
