"""``main.py`` whose loss turns NaN at one step on one rank, as a diverging run's would.

    FLEXBERT_TEST_NAN_STEP=3 FLEXBERT_TEST_NAN_RANK=1 composer -n 2 tests/nan_at_step.py RECIPE.yaml

Only the named rank's loss is poisoned, so the NaN guard must bring every rank to the same decision.
"""

import math
import os
import sys

from composer.core import Callback
from composer.utils import dist

import flexbert.train.pretrain
from flexbert.cli import main


class NanLossAt(Callback):
    def __init__(self, step: int, rank: int):
        self.step = step
        self.rank = rank

    def after_loss(self, state, logger) -> None:
        if state.timestamp.batch.value == self.step and dist.get_global_rank() == self.rank:
            state.loss = state.loss * math.nan


def build_trainer_that_diverges(config, resolved):
    trainer = build_trainer(config, resolved)
    poison = NanLossAt(int(os.environ["FLEXBERT_TEST_NAN_STEP"]), int(os.environ["FLEXBERT_TEST_NAN_RANK"]))
    trainer.state.callbacks.insert(0, poison)  # before the guard, so the guard sees it
    return trainer


build_trainer = flexbert.train.pretrain.build_trainer
flexbert.train.pretrain.build_trainer = build_trainer_that_diverges

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
