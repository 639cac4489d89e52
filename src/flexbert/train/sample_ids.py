"""A debugging record of the data each training step used, to check that resumption is exact.

With ``debug: {log_sample_ids: true}``, every rank appends one line per training step to
``RUN_DIR/sample_ids/rank{R}.jsonl``: ``{"step": S, "pieces": [[stream, sample, start, end], ...]}``,
the pieces (token ranges of documents, ``stream`` indexing ``train_loader.streams`` in order) packed
into that rank's batch. Steps are numbered as in ``metrics.jsonl``. A run killed after its last
checkpoint leaves lines for steps that its resumption trains again; :func:`read_sample_ids` drops
them, as :func:`~flexbert.train.loggers.read_metrics` does for metrics.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from flexbert.core.checkpoint import RunDir
from flexbert.errors import MissingFileError
from flexbert.train.loggers import ends_mid_line, read_step_lines


@dataclass
class DebugConfig:
    """The ``debug:`` section of a recipe: records that cost time, all off by default."""

    # RUN_DIR/sample_ids/rank{R}.jsonl: one line per step and rank, written as the step ends
    log_sample_ids: bool = False


class SampleIdLog(Callback):
    """Appends each step's pieces to this rank's file, flushed at once so a killed run loses none.

    Each line also names the run's ``mask_seed``: a piece's masks are drawn from the mask seed, the
    epoch it was read in and its key, so pieces logged under different mask seeds (two phases, say)
    never share their masks."""

    def __init__(self, run_dir: str | Path, mask_seed: int | None = None):
        self.folder = RunDir(Path(run_dir)).sample_ids
        self.mask_seed = mask_seed
        self._file = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank{dist.get_global_rank()}.jsonl"
        cut_short = ends_mid_line(path)
        self._file = path.open("a", encoding="utf-8")
        if cut_short:  # end the killed run's partial line, so the lines this run appends stay whole
            self._file.write("\n")

    def batch_end(self, state: State, logger: Logger) -> None:
        # The clock has already moved past the step that just ended.
        step = state.timestamp.batch.value - 1
        pieces = state.batch["piece_keys"].tolist()
        self._file.write(json.dumps({"step": step, "pieces": pieces, "mask_seed": self.mask_seed}) + "\n")
        self._file.flush()

    def close(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_sample_ids(run_dir: str | Path) -> dict[int, list[dict[str, Any]]]:
    """Per rank, the steps the run finally trained, in order, each ``{"step", "pieces", "mask_seed"}``."""
    folder = RunDir(Path(run_dir)).sample_ids
    files = sorted(folder.glob("rank*.jsonl"))
    if not files:
        raise MissingFileError(f"{folder}: no sample-id logs; was {run_dir} trained with debug.log_sample_ids: true?")
    return {int(path.stem.removeprefix("rank")): read_step_lines(path) for path in files}


def trained_pieces(run_dir: str | Path) -> Counter[tuple[int, int, int, int]]:
    """How many times the run trained on each (stream, sample, start, end) piece, over all steps and ranks."""
    return Counter(
        tuple(piece) for rows in read_sample_ids(run_dir).values() for row in rows for piece in row["pieces"]
    )
