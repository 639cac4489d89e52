"""Where a run's metrics go: ``RUN_DIR/metrics.jsonl`` and Weights & Biases, and the ``logging:``
config section that chooses them and the measuring callbacks."""

from __future__ import annotations

import json
import netrc
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from composer.core import State, Time, TimeUnit
from composer.loggers import Logger, LoggerDestination, WandBLogger
from composer.utils import dist

from flexbert.core.checkpoint import RunDir
from flexbert.errors import MissingFileError, RunFolderError
from flexbert.typed_config import ConfigError, from_dict

WandbMode = Literal["online", "offline", "disabled"]


def _plain(value: Any) -> Any:
    """Tensors and NumPy scalars as JSON numbers (or lists)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as JSON")


class JSONLinesLogger(LoggerDestination):
    """Appends one JSON object per step, ``{"step": batch, "tokens": ..., <metric>: value, ...}``,
    to ``RUN_DIR/metrics.jsonl`` on rank 0.

    Composer logs a step's metrics in pieces (the loss during the batch, callbacks after it,
    evaluation after those), so a step's line is written, and the file flushed, when the first
    metric of a later step arrives, or when training ends. ``tokens`` is the run's token count when
    the step began, as the train DataSpec's ``get_num_tokens_in_batch`` counts them. A resumed run
    appends to the same file; :func:`read_metrics` lets the resumed steps supersede the ones the
    interrupted run logged past its checkpoint. Non-finite values are written as ``NaN``/
    ``Infinity``, which Python's json reads back.
    """

    def __init__(self, run_dir: str | Path):
        self.path = RunDir(Path(run_dir)).metrics_file
        self._file = None
        self._state: State | None = None
        self._row: dict[str, Any] | None = None

    def init(self, state: State, logger: Logger) -> None:
        self._state = state
        if dist.get_global_rank() != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut_short = ends_mid_line(self.path)
        self._file = self.path.open("a", encoding="utf-8")
        if cut_short:  # end the killed run's partial line, so the lines this run appends stay whole
            self._file.write("\n")

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._file is None:
            return
        timestamp = self._state.timestamp
        step = timestamp.batch.value if step is None else step
        if self._row is not None and self._row["step"] != step:
            self._write()
        if self._row is None:
            self._row = {"step": step, "tokens": timestamp.token.value}
        self._row.update(metrics)

    def _write(self) -> None:
        if self._row is None:
            return
        self._file.write(json.dumps(self._row, default=_plain) + "\n")
        self._file.flush()
        self._row = None

    def fit_end(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            self._write()

    def close(self, state: State, logger: Logger) -> None:
        if self._file is not None:
            self._write()
            self._file.close()
            self._file = None


def ends_mid_line(path: Path) -> bool:
    """Whether a process was killed while writing the file's last line."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) != b"\n"


def read_step_lines(path: Path) -> list[dict[str, Any]]:
    """The ``{"step": ...}`` JSON lines of a file that resumed runs append to, as the run's final history.

    One process writes steps in increasing order, so a step at or below the last one read means a
    resumed run went back to its checkpoint: the lines from that step on describe training the
    checkpoint rolled back and are dropped. Lines that are not JSON (cut short by a killed process)
    are skipped with a warning.
    """
    rows: list[dict[str, Any]] = []
    skipped = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if rows and row["step"] <= rows[-1]["step"]:
            rows = [kept for kept in rows if kept["step"] < row["step"]]
        rows.append(row)
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} line(s) that are not JSON (cut short by a killed run?)")
    return rows


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``RUN_DIR/metrics.jsonl`` as the final history of the run (see :func:`read_step_lines`)."""
    path = RunDir(Path(run_dir)).metrics_file
    if not path.is_file():
        raise MissingFileError(
            f"{path}: no metrics file; is {run_dir} the directory of a run that logged with logging.jsonl enabled?"
        )
    rows = read_step_lines(path)
    if not rows:
        raise RunFolderError(f"{path}: holds no metrics yet")
    return rows


def wandb_api_key_available() -> bool:
    """Whether W&B can authenticate without asking: WANDB_API_KEY, or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC") or Path.home() / ".netrc").authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(requested: str | None = None) -> str:
    """WANDB_MODE if set, else ``requested``, else online; online without a key becomes offline,
    because W&B would otherwise stop to prompt for one (or fail) at the start of training."""
    mode = os.environ.get("WANDB_MODE") or requested or "online"
    if mode == "online" and not wandb_api_key_available():
        warnings.warn(
            "no W&B API key (WANDB_API_KEY or a netrc entry for api.wandb.ai): logging to W&B offline; "
            "upload the run later with `wandb sync`"
        )
        return "offline"
    return mode


class WandBMetricsLogger(WandBLogger):
    """Composer's W&B logger for metrics only. Composer's autoresume asks every logger for the latest
    checkpoint before any logger is initialised, and Composer 0.32.1's W&B logger then raises a
    RuntimeError (no entity yet) that autoresume does not expect, so every fresh run with
    ``autoresume: true`` and W&B logging crashed. Checkpoints live in ``save_folder``, never in W&B,
    so this logger answers that it holds none."""

    def download_file(
        self, remote_file_name: str, destination: str, overwrite: bool = False, progress_bar: bool = True
    ):
        raise NotImplementedError("flexbert keeps checkpoints in save_folder, not in W&B artifacts")


def build_wandb_logger(
    project: str,
    entity: str | None = None,
    run_name: str | None = None,
    tags: Sequence[str] = (),
    mode: str | None = None,
    run_dir: str | Path | None = None,
) -> WandBLogger:
    """Composer's W&B logger, set up never to block or prompt (see :func:`resolve_wandb_mode`).

    Its files go to ``run_dir/wandb`` when ``run_dir`` is given (else WANDB_DIR or the working
    directory); an offline run there can be uploaded later with ``wandb sync``.
    """
    import wandb

    init_kwargs: dict[str, Any] = {
        "mode": resolve_wandb_mode(mode),
        # W&B's own default waits 90 s for its service before failing; fail sooner and quietly.
        "settings": wandb.Settings(silent=True, init_timeout=60),
    }
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        init_kwargs["dir"] = str(run_dir)
    return WandBMetricsLogger(project=project, entity=entity, name=run_name, tags=list(tags), init_kwargs=init_kwargs)


@dataclass
class WandbConfig:
    project: str
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: WandbMode | None = None  # WANDB_MODE overrides it; default online


@dataclass
class LoggingConfig:
    """The ``logging:`` section of a recipe."""

    jsonl: bool = True  # RUN_DIR/metrics.jsonl
    wandb: WandbConfig | None = None  # no W&B without this section
    progress_bar: bool = True  # for the Trainer's own progress_bar argument
    log_interval: str = "1ba"  # how often the measuring callbacks log, in batches
    peak_tflops: float | None = None  # per-device peak for MFU; default: GPU table, or measured on CPU
    memory: bool = True  # CUDA memory statistics (never on CPU)
    throughput_window: int = 10  # batches averaged in each throughput figure

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None = None, path: str = "logging") -> LoggingConfig:
        return from_dict(cls, dict(data or {}), path)

    def validate(self, path: str = "logging") -> None:
        """Raise :class:`ConfigError` naming the first field whose value cannot work."""
        self.log_every_batches(path)
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError(f"{path}.peak_tflops", f"must be > 0, got {self.peak_tflops}")
        if self.throughput_window < 1:
            raise ConfigError(f"{path}.throughput_window", f"must be at least 1, got {self.throughput_window}")

    def log_every_batches(self, path: str = "logging") -> int:
        try:
            interval = Time.from_timestring(self.log_interval)
        except (TypeError, ValueError):
            interval = None
        if interval is None or interval.unit != TimeUnit.BATCH or interval.value < 1:
            raise ConfigError(
                f"{path}.log_interval", f"must be a whole number of batches such as '10ba', got {self.log_interval!r}"
            )
        return interval.value


def build_loggers(config: LoggingConfig, run_dir: str | Path, run_name: str) -> list[LoggerDestination]:
    loggers: list[LoggerDestination] = []
    if config.jsonl:
        loggers.append(JSONLinesLogger(run_dir))
    if config.wandb is not None:
        loggers.append(
            build_wandb_logger(
                config.wandb.project, config.wandb.entity, run_name, config.wandb.tags, config.wandb.mode, run_dir
            )
        )
    return loggers
