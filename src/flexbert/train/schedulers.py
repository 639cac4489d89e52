"""Learning-rate schedules: a linear warmup, a stable plateau, and a decay over the end of the run.

A schedule is a Composer scheduler: a function of the trainer's state that returns a multiplier of
the optimizer's peak lr. Lengths are Composer time strings in tokens (``3_000_000_000tok``),
samples (``sp``), batches (``100ba``) or fractions of the run (``0.1dur``), so a recipe can state
ModernBERT's schedule in the tokens it was published in, whatever the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from composer.core import State, Time, TimeUnit
from composer.optim import ComposerScheduler

from flexbert.registry import Registry
from flexbert.typed_config import ConfigError

SCHEDULERS: Registry[Callable[[SchedulerConfig], ComposerScheduler]] = Registry(
    "scheduler",
    "factory(config: SchedulerConfig) -> scheduler(state, ssr=1.0) -> lr multiplier",
    "the learning-rate multiplier over training time",
)

# Units the trainer counts in. Epochs are too coarse to ramp over, and wall-clock time would make
# the schedule irreproducible.
COUNTED_UNITS = (TimeUnit.TOKEN, TimeUnit.SAMPLE, TimeUnit.BATCH)
LENGTH_UNITS = (*COUNTED_UNITS, TimeUnit.DURATION)

# Each maps decay progress in [0, 1] to the fraction of the way from the final lr to the peak.
DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    # Drops fastest at the start of the decay (Hägele et al., 2024); ModernBERT's final phase.
    "1-sqrt": lambda progress: 1.0 - math.sqrt(progress),
}


def parse_time(value: str, key_path: str) -> Time:
    """``"3_000_000_000tok"``, ``"100ba"`` ... as a Composer Time."""
    try:
        return Time.from_timestring(value.replace("_", ""))
    except (ValueError, TypeError) as err:
        raise ConfigError(key_path, f"not a duration like '1000ba' or '3_000_000_000tok': {value!r} ({err})") from None


def parse_length(text: str) -> Time:
    """A schedule length from a time string; underscores group digits, as in ``3_000_000_000tok``."""
    try:
        time = Time.from_timestring(text.replace("_", ""))
    except TypeError as err:  # Composer's complaint about a fractional count, such as '1.5ba'
        raise ValueError(str(err)) from None
    if time.unit not in LENGTH_UNITS:
        raise ValueError(
            f"{text!r} is in {time.unit.value}; give lengths in {', '.join(u.value for u in LENGTH_UNITS)}"
        )
    if time.value < 0:
        raise ValueError(f"{text!r} is negative")
    if time.unit == TimeUnit.DURATION and time.value > 1:
        raise ValueError(f"{text!r} is longer than the run")
    return time


def _absolute(length: Time, state: State, ssr: float) -> Time:
    """``length`` in the unit it is counted in, a ``dur`` fraction becoming the run's own unit.

    A scale-schedule ratio stretches absolute lengths; ``dur`` lengths stretch with the run, whose
    ``max_duration`` Composer has already scaled.
    """
    if length.unit != TimeUnit.DURATION:
        return Time(int(length.value * ssr), length.unit)
    run = state.max_duration
    if run is None or run.unit not in COUNTED_UNITS:
        raise ValueError(f"cannot resolve {length} against max_duration={run}; give max_duration in tok, sp or ba")
    return Time(int(length.value * run.value), run.unit)


class WarmupStableDecay(ComposerScheduler):
    """Linear warmup from 0, the peak lr, then a decay to ``final_lr_ratio`` × peak over the last ``decay``.

    ``decay`` ends with the run: it is placed against ``state.max_duration``, which must be counted in
    the same unit (or ``decay`` given as a fraction of the run). A zero ``decay`` never decays. Where a
    warmup and a decay overlap, the lower of the two applies.
    """

    def __init__(self, warmup: Time, decay: Time, decay_shape: str = "1-sqrt", final_lr_ratio: float = 0.0):
        self.warmup = warmup
        self.decay = decay
        self.shape = DECAY_SHAPES[decay_shape]
        self.final_lr_ratio = final_lr_ratio

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        return min(self._warmup(state, ssr), self._decay(state, ssr))

    def _warmup(self, state: State, ssr: float) -> float:
        warmup = _absolute(self.warmup, state, ssr)
        if warmup.value == 0:
            return 1.0
        return min(1.0, state.timestamp.get(warmup.unit).value / warmup.value)

    def _decay(self, state: State, ssr: float) -> float:
        decay = _absolute(self.decay, state, ssr)
        if decay.value == 0:
            return 1.0
        run = state.max_duration
        if run is None or run.unit != decay.unit:
            raise ValueError(
                f"the decay ({self.decay}) ends with the run, but max_duration={run} is not counted in "
                f"{decay.unit.value}; give both in the same unit, or the decay as a fraction ('0.1dur')"
            )
        start = run.value - decay.value
        if start < 0:
            raise ValueError(f"the decay ({decay}) is longer than the run (max_duration={run})")
        progress = min(1.0, max(0.0, (state.timestamp.get(decay.unit).value - start) / decay.value))
        return self.final_lr_ratio + (1.0 - self.final_lr_ratio) * self.shape(progress)


@SCHEDULERS.register("warmup_stable_decay")
def warmup_stable_decay(config: SchedulerConfig) -> WarmupStableDecay:
    """Linear warmup, constant, then a linear, cosine or 1-sqrt decay over the end of the run."""
    return WarmupStableDecay(
        parse_length(config.warmup), parse_length(config.decay), config.decay_shape, config.final_lr_ratio
    )


@SCHEDULERS.register("constant_with_warmup")
def constant_with_warmup(config: SchedulerConfig) -> WarmupStableDecay:
    """Linear warmup, then constant: ModernBERT's pretraining and context-extension phases."""
    return WarmupStableDecay(parse_length(config.warmup), Time(0, TimeUnit.BATCH))


@dataclass
class SchedulerConfig:
    """The ``scheduler:`` section of a recipe."""

    name: str = "warmup_stable_decay"
    warmup: str = "0ba"
    decay: str = "0ba"  # the last stretch of the run, over which the lr falls to final_lr_ratio × peak
    decay_shape: str = "1-sqrt"
    final_lr_ratio: float = 0.0

    def validate(self, path: str = "scheduler") -> None:
        """Raise :class:`ConfigError` naming the first field whose value cannot work."""
        if self.name not in SCHEDULERS:
            raise ConfigError(
                f"{path}.name", f"unknown scheduler {self.name!r}; registered: {', '.join(SCHEDULERS.names())}"
            )
        lengths = {}
        for key in ("warmup", "decay"):
            try:
                lengths[key] = parse_length(getattr(self, key))
            except ValueError as err:
                raise ConfigError(f"{path}.{key}", str(err)) from None
        warmup, decay = lengths["warmup"], lengths["decay"]
        if warmup.unit == decay.unit == TimeUnit.DURATION and warmup.value + decay.value > 1:
            raise ConfigError(f"{path}.decay", f"warmup {self.warmup} and decay {self.decay} overlap")
        if self.name == "constant_with_warmup" and decay.value != 0:
            raise ConfigError(f"{path}.decay", "constant_with_warmup never decays; use warmup_stable_decay")
        if self.decay_shape not in DECAY_SHAPES:
            raise ConfigError(
                f"{path}.decay_shape", f"unknown shape {self.decay_shape!r}; choose from {', '.join(DECAY_SHAPES)}"
            )
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ConfigError(f"{path}.final_lr_ratio", f"must be in [0, 1], got {self.final_lr_ratio}")


def build_scheduler(config: SchedulerConfig) -> ComposerScheduler:
    """The Composer scheduler a validated config describes, for ``Trainer(schedulers=...)``."""
    return SCHEDULERS.get(config.name)(config)
