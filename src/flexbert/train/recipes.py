"""Which kind of run a resolved recipe describes, and its validated config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def parse_recipe(raw: dict[str, Any], world_size: int = 1) -> tuple[Any, Callable]:
    """(config, build_trainer) for a fine-tuning recipe (it has a ``task:``) or a pretraining one,
    validated before anything heavy is built."""
    if "task" in raw:
        from flexbert.train.finetune import FinetuneConfig, build_finetune_trainer

        return FinetuneConfig.from_dict(raw), build_finetune_trainer
    from flexbert.train.pretrain import TrainConfig, build_trainer

    return TrainConfig.from_dict(raw, world_size=world_size), build_trainer
