"""Figures of a run from its ``metrics.jsonl``: loss, throughput and learning rate against tokens.

Figures are drawn with matplotlib's object API (Agg renderer), never pyplot, so plotting neither
needs a display nor changes the backend of the process it runs in.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from flexbert.core.checkpoint import RunDir
from flexbert.errors import RunFolderError
from flexbert.train.loggers import read_metrics

# Evaluation losses as Composer names them: metrics/<evaluator label>/<metric name>.
_EVAL_LOSS = re.compile(r"^metrics/(?!train/)[^/]+/.*(loss|crossentropy)", re.IGNORECASE)


@dataclass(frozen=True)
class _Panel:
    ylabel: str
    selects: Callable[[str], bool]  # which metric keys it draws
    from_zero: bool = False  # rates: an axis cut above zero would magnify jitter into swings


_FIGURES: dict[str, list[_Panel]] = {
    "loss": [_Panel("loss", lambda key: key == "loss/train/total" or bool(_EVAL_LOSS.match(key)))],
    "throughput": [
        _Panel("tokens/s", lambda key: key == "throughput/tokens_per_sec", from_zero=True),
        _Panel("MFU (fraction of peak)", lambda key: key == "throughput/mfu", from_zero=True),
    ],
    "lr": [_Panel("learning rate", lambda key: key.startswith("lr-"))],
}


def _series(rows: list[dict[str, Any]], x_key: str, selects: Callable[[str], bool]) -> dict[str, tuple[list, list]]:
    series: dict[str, tuple[list, list]] = {}
    for row in rows:
        for key, value in row.items():
            if selects(key) and isinstance(value, (int, float)):
                xs, ys = series.setdefault(key, ([], []))
                xs.append(row[x_key])
                ys.append(value)
    return series


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw ``loss.png``, ``throughput.png`` and ``lr.png`` in ``run_dir/plots`` from the run's
    metrics (a figure whose metrics were never logged is left out) and return their paths."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    # Tokens are the honest x axis across batch-size warmup; a DataSpec that counts none leaves
    # them at 0, and then batches are all there is.
    x_key, x_label = ("tokens", "tokens") if any(row["tokens"] for row in rows) else ("step", "batches")
    out_dir = RunDir(run_dir).plots
    written = []
    for name, panels in _FIGURES.items():
        drawn = [(panel, series) for panel in panels if (series := _series(rows, x_key, panel.selects))]
        if not drawn:
            continue
        figure = Figure(figsize=(8, 3.2 * len(drawn)), layout="constrained")
        axes = figure.subplots(len(drawn), 1, sharex=True, squeeze=False)[:, 0]
        for ax, (panel, series) in zip(axes, drawn):
            for key, (xs, ys) in series.items():
                # Evaluations are sparse: mark each point so a single one is still visible.
                ax.plot(xs, ys, label=key, marker="o" if _EVAL_LOSS.match(key) else None, markersize=3)
            ax.set_ylabel(panel.ylabel)
            if panel.from_zero:
                ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        axes[-1].set_xlabel(x_label)
        axes[-1].xaxis.set_major_formatter(EngFormatter())
        figure.suptitle(f"{run_dir.name}: {name}")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{name}.png"
        figure.savefig(path, dpi=120)
        written.append(path)
    if not written:
        raise RunFolderError(
            f"{RunDir(run_dir).metrics_file}: none of loss/train/total, throughput/tokens_per_sec "
            "or lr-* was logged, so there is nothing to plot"
        )
    return written
