"""``main.py`` that holds still mid-step, so a test can SIGKILL a run at a known point.

    FLEXBERT_TEST_PAUSE_AT_STEP=7 FLEXBERT_TEST_PAUSE_MARKERS=DIR python tests/pause_at_step.py RECIPE.yaml
    FLEXBERT_TEST_PAUSE_AT_STEP=7 FLEXBERT_TEST_PAUSE_MARKERS=DIR composer -n 2 tests/pause_at_step.py RECIPE.yaml

Every rank trains normally until step 7 (numbered as in metrics.jsonl), then, after the backward
pass of its first microbatch and before the optimizer step, creates ``DIR/rank{R}`` and waits to be
killed. It gives up after a few minutes, so a failed test leaves no process behind.
"""

import os
import sys
import time
from pathlib import Path

from composer.core import Callback
from composer.utils import dist

import flexbert.train.pretrain
from flexbert.cli import main

GIVE_UP_SECONDS = 300


class PauseAtStep(Callback):
    def __init__(self, step: int, markers: Path):
        self.step = step
        self.markers = markers

    def after_backward(self, state, logger) -> None:
        if state.timestamp.batch.value != self.step:
            return
        self.markers.mkdir(parents=True, exist_ok=True)
        (self.markers / f"rank{dist.get_global_rank()}").touch()
        time.sleep(GIVE_UP_SECONDS)
        os._exit(3)


def build_trainer_that_pauses(config, resolved):
    trainer = build_trainer(config, resolved)
    pause = PauseAtStep(int(os.environ["FLEXBERT_TEST_PAUSE_AT_STEP"]), Path(os.environ["FLEXBERT_TEST_PAUSE_MARKERS"]))
    trainer.state.callbacks.append(pause)
    return trainer


build_trainer = flexbert.train.pretrain.build_trainer
flexbert.train.pretrain.build_trainer = build_trainer_that_pauses

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
