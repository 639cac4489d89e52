"""Which kind of run a resolved recipe describes, and its validated config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flexbert.train import finetune, pretrain


def parse_recipe(raw: dict[str, Any], world_size: int = 1) -> tuple[Any, Callable]:
    """(config, build_trainer) for a fine-tuning recipe (it has a ``task:``) or a pretraining one,
    validated before anything heavy is built. The builder is looked up when called, so that a test
    (or a script such as ``tests/nan_at_step.py``) can wrap it."""
    if "task" in raw:
        return finetune.FinetuneConfig.from_dict(raw), finetune.build_finetune_trainer
    return pretrain.TrainConfig.from_dict(raw, world_size=world_size), pretrain.build_trainer
