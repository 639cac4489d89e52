"""Training measurements and where they go: throughput/MFU, packing and gradient-norm callbacks on
a hand-driven Composer state, metrics.jsonl, offline W&B, plots, and one real tiny Trainer run."""

import json
import warnings
from itertools import accumulate

import numpy as np
import pytest
import torch
from composer import Trainer
from composer.core import DataSpec, Event, State
from composer.devices import DeviceCPU
from composer.loggers import InMemoryLogger, Logger, WandBLogger
from composer.models import ComposerModel
from conftest import tiny_config
from PIL import Image

from flexbert.core.model import FlexBertForMaskedLM
from flexbert.train import monitors as monitors_module
from flexbert.train.flops import batch_training_flops, gpu_peak_flops
from flexbert.train.loggers import (
    JSONLinesLogger,
    LoggingConfig,
    build_loggers,
    build_wandb_logger,
    read_metrics,
    resolve_wandb_mode,
)
from flexbert.train.monitors import GradNormMonitor, PackingMonitor, ThroughputMonitor, build_monitors, cpu_matmul_flops
from flexbert.train.plotting import plot_run
from flexbert.typed_config import ConfigError


def packed_batch(doc_lengths, num_rows, row_tokens, predicted_every=3, seed=0):
    """An unpadded batch as the packed loader hands it to the trainer."""
    total = sum(doc_lengths)
    input_ids = torch.randint(3, 256, (total,), generator=torch.Generator().manual_seed(seed))
    labels = torch.full((total,), -100)
    labels[::predicted_every] = input_ids[::predicted_every]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "cu_seqlens": torch.tensor([0, *accumulate(doc_lengths)], dtype=torch.int32),
        "masked_index": torch.arange(0, total, predicted_every),
        "max_seqlen": max(doc_lengths),
        "host_cu_seqlens": np.array([0, *accumulate(doc_lengths)]),
        "num_rows": num_rows,
        "row_tokens": row_tokens,
    }


class Harness:
    """A real Composer State and Logger, driven event by event without a Trainer."""

    def __init__(self, *callbacks, model=None):
        self.state = State(model=model or torch.nn.Linear(2, 2), rank_zero_seed=0, run_name="test", device=DeviceCPU())
        self.recorder = InMemoryLogger()
        self.logger = Logger(self.state, destinations=[self.recorder])
        self.recorder.init(self.state, self.logger)
        self.callbacks = callbacks

    def event(self, event):
        for callback in self.callbacks:
            callback.run_event(event, self.state, self.logger)

    def train_batch(self, batch):
        self.state.batch = batch
        self.state.timestamp = self.state.timestamp.to_next_batch(
            samples=batch["num_rows"], tokens=len(batch["input_ids"])
        )
        self.event(Event.BATCH_END)

    def logged(self, key):
        """(step, value) pairs logged under ``key``."""
        return [(timestamp.batch.value, value) for timestamp, value in self.recorder.data.get(key, [])]


@pytest.fixture
def clock(monkeypatch):
    """A scripted time.perf_counter: set ``clock.now`` before each event."""

    class Clock:
        now = 0.0

    monitors_module.cpu_matmul_flops()  # the CPU peak is measured once, on the real clock
    monkeypatch.setattr(monitors_module.time, "perf_counter", lambda: Clock.now)
    return Clock


# --- throughput and MFU -----------------------------------------------------------------------


def test_throughput_and_mfu_over_a_sliding_window(clock):
    config = tiny_config()
    monitor = ThroughputMonitor(config, peak_tflops=1e-6, window=2)  # a 1 MFLOP/s device
    harness = Harness(monitor)
    batches = [
        packed_batch([30, 20, 14], 1, 64, seed=0),
        packed_batch([64, 64], 2, 64, seed=1),
        packed_batch([10] * 12, 2, 64, seed=2),
    ]
    seconds = [1.0, 2.0, 0.5]
    harness.event(Event.FIT_START)
    for batch, duration in zip(batches, seconds):
        clock.now += duration
        harness.train_batch(batch)

    flops = [batch_training_flops(config, b["cu_seqlens"], b["labels"]) for b in batches]
    tokens = [len(b["input_ids"]) for b in batches]
    # Nothing until the window holds 2 batches; then batches (1, 2), then (2, 3).
    assert [step for step, _ in harness.logged("throughput/tokens_per_sec")] == [2, 3]
    assert harness.logged("throughput/tokens_per_sec")[-1][1] == pytest.approx((tokens[1] + tokens[2]) / 2.5)
    assert harness.logged("throughput/samples_per_sec")[-1][1] == pytest.approx(4 / 2.5)
    assert harness.logged("throughput/flops_per_sec")[0][1] == pytest.approx((flops[0] + flops[1]) / 3.0)
    assert harness.logged("throughput/mfu")[-1][1] == pytest.approx((flops[1] + flops[2]) / 2.5 / 1e6)
    assert harness.logged("throughput/device/tokens_per_sec") == harness.logged("throughput/tokens_per_sec")


def test_evaluation_time_does_not_count_against_throughput(clock):
    monitor = ThroughputMonitor(tiny_config(), peak_tflops=1.0, window=1)
    harness = Harness(monitor)
    batch = packed_batch([40, 24], 1, 64)
    harness.event(Event.FIT_START)
    clock.now = 1.0
    harness.train_batch(batch)
    clock.now = 31.0  # a 30 s evaluation
    harness.event(Event.EVAL_END)
    clock.now = 32.0
    harness.train_batch(batch)
    assert [value for _, value in harness.logged("throughput/tokens_per_sec")] == [64.0, 64.0]


def test_log_every_skips_steps(clock):
    harness = Harness(
        ThroughputMonitor(tiny_config(), peak_tflops=1.0, window=1, log_every=2),
        PackingMonitor(log_every=2),
        GradNormMonitor(log_every=2),
    )
    harness.event(Event.FIT_START)
    for _ in range(5):
        clock.now += 1
        harness.train_batch(packed_batch([16, 16], 1, 32))
    for key in ("throughput/tokens_per_sec", "packing/efficiency"):
        assert [step for step, _ in harness.logged(key)] == [2, 4]


def test_peak_flops_come_from_the_gpu_table_or_a_cpu_measurement():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA H200") == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("NVIDIA L4") == 121e12 and gpu_peak_flops("NVIDIA L40S") == 362e12
    assert gpu_peak_flops("Tesla T4") is None
    measured = cpu_matmul_flops()
    assert 1e8 < measured < 1e13 and cpu_matmul_flops() == measured  # measured once, then cached


def test_mfu_on_cpu_uses_the_measured_peak(clock):
    monitor = ThroughputMonitor(tiny_config(), window=1)
    harness = Harness(monitor)
    harness.event(Event.FIT_START)
    assert monitor.peak_flops == cpu_matmul_flops()
    clock.now = 1.0
    batch = packed_batch([50, 14], 1, 64)
    harness.train_batch(batch)
    flops = batch_training_flops(tiny_config(), batch["cu_seqlens"], batch["labels"])
    assert harness.logged("throughput/mfu") == [(1, pytest.approx(flops / cpu_matmul_flops()))]


# --- packing, batch size, gradient norm -------------------------------------------------------


def test_packing_efficiency_and_batch_size():
    harness = Harness(PackingMonitor())
    harness.train_batch(packed_batch([60, 60, 100], 4, 64))  # 220 of 256 slots
    harness.train_batch(packed_batch([64] * 8, 8, 64))  # full, and the batch has grown
    assert harness.logged("packing/efficiency") == [(1, 220 / 256), (2, 1.0)]
    assert harness.logged("packing/efficiency_cumulative")[-1] == (2, pytest.approx((220 + 512) / (256 + 512)))
    assert harness.logged("batch/rows") == [(1, 4), (2, 8)]
    assert harness.logged("batch/tokens") == [(1, 220), (2, 512)]


def test_grad_norm_is_the_global_l2_norm():
    model = torch.nn.Linear(3, 2)
    model.weight.grad = torch.full((2, 3), 2.0)
    model.bias.grad = torch.tensor([3.0, 0.0])
    harness = Harness(GradNormMonitor(), model=model)
    harness.train_batch(packed_batch([8], 1, 8))
    assert harness.logged("l2_norm/grad/global") == [(1, pytest.approx((6 * 4 + 9) ** 0.5))]


# --- metrics.jsonl ----------------------------------------------------------------------------


def test_jsonl_writes_one_line_per_step_and_appends_on_resume(tmp_path):
    def run(steps):
        destination = JSONLinesLogger(tmp_path)
        harness = Harness()
        logger = Logger(harness.state, destinations=[destination])
        destination.init(harness.state, logger)
        lines_before = len((tmp_path / "metrics.jsonl").read_text().splitlines())
        for done, step in enumerate(steps):
            harness.state.timestamp = harness.state.timestamp.copy(batch=step, token=100 * step)
            logger.log_metrics({"loss/train/total": 10.0 - step})  # logged in pieces, as Composer does
            # A step's line is on disk as soon as the next step begins.
            assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == lines_before + done
            logger.log_metrics({"throughput/tokens_per_sec": torch.tensor(5.0)})
        destination.close(harness.state, logger)

    run(range(4))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[1] == {"step": 1, "tokens": 100, "loss/train/total": 9.0, "throughput/tokens_per_sec": 5.0}
    assert [line["step"] for line in lines] == [0, 1, 2, 3]

    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"step": 4, "loss/tr')  # killed mid-write
    run(range(2, 5))  # resumed from a checkpoint at step 2
    raw = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(raw) == 8 and raw[4] == '{"step": 4, "loss/tr'
    with pytest.warns(UserWarning, match="skipped 1 line"):
        rows = read_metrics(tmp_path)
    # The resumed run's steps 2-4 replace the interrupted run's 2-3.
    assert [(row["step"], row["tokens"]) for row in rows] == [(0, 0), (1, 100), (2, 200), (3, 300), (4, 400)]


def test_read_metrics_explains_a_missing_or_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no metrics"):
        read_metrics(tmp_path)


# --- W&B --------------------------------------------------------------------------------------


@pytest.fixture
def no_wandb_key(monkeypatch, tmp_path):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    return tmp_path


def test_wandb_mode_is_offline_without_a_key(no_wandb_key, monkeypatch):
    with pytest.warns(UserWarning, match="no W&B API key"):
        assert resolve_wandb_mode() == "offline"
    (no_wandb_key / "netrc").write_text("machine api.wandb.ai login user password abc123\n")
    assert resolve_wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment overrides the recipe
    assert resolve_wandb_mode("online") == "offline"
    monkeypatch.delenv("WANDB_MODE")
    (no_wandb_key / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode() == "online"
    assert resolve_wandb_mode("disabled") == "disabled"


def test_wandb_offline_run_logs_without_network(no_wandb_key):
    run_dir = no_wandb_key / "run"
    with pytest.warns(UserWarning, match="offline"):
        destination = build_wandb_logger("flexbert-test", run_name="tiny", tags=["ci"], run_dir=run_dir)
    harness = Harness()
    logger = Logger(harness.state, destinations=[destination])
    destination.init(harness.state, logger)
    import wandb

    assert wandb.run is not None and wandb.run.settings.mode == "offline"
    logger.log_metrics({"loss/train/total": 3.5})
    destination.post_close()
    assert wandb.run is None
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("run-*.wandb"))


# --- config -----------------------------------------------------------------------------------


# Also refused by `flexbert train` itself: tests/test_bad_inputs.py.
LOGGING_CONFIG_ERRORS = [
    ({"log_interval": "1ep"}, "logging.log_interval", "whole number of batches"),
    ({"log_interval": "0ba"}, "logging.log_interval", "whole number of batches"),
    ({"peak_tflops": 0}, "logging.peak_tflops", "must be > 0"),
    ({"peak_tflops": -3.0}, "logging.peak_tflops", "must be > 0"),
    ({"throughput_window": 0}, "logging.throughput_window", "at least 1"),
    ({"wandb": {"project": "p", "mode": "sometimes"}}, "logging.wandb.mode", "must be one of"),
    ({"wandb": {"entity": "e"}}, "logging.wandb.project", "missing required key"),
    ({"jsonll": True}, "logging.jsonll", "unknown key"),
]


@pytest.mark.parametrize("values,key_path,message", LOGGING_CONFIG_ERRORS)
def test_logging_config_errors_name_their_key(values, key_path, message):
    with pytest.raises(ConfigError, match=message) as info:
        LoggingConfig.from_dict(values)
    assert info.value.key_path == key_path


def test_builders_follow_the_config(tmp_path, no_wandb_key):
    config = LoggingConfig.from_dict({"log_interval": "5ba", "wandb": {"project": "p", "mode": "disabled"}})
    jsonl, wandb_logger = build_loggers(config, tmp_path, "run")
    assert isinstance(jsonl, JSONLinesLogger) and isinstance(wandb_logger, WandBLogger)
    callbacks = build_monitors(config, tiny_config())
    assert [type(cb).__name__ for cb in callbacks] == [
        "ThroughputMonitor",
        "PackingMonitor",
        "GradNormMonitor",
        "LRMonitor",
    ]  # no MemoryMonitor on CPU
    assert callbacks[0].log_every == 5
    assert build_loggers(LoggingConfig(jsonl=False), tmp_path, "run") == []


# --- plots ------------------------------------------------------------------------------------


def test_plot_run_draws_loss_throughput_and_lr(tmp_path):
    rows = [
        {
            "step": s,
            "tokens": 4096 * s,
            "loss/train/total": 6.0 / (1 + 0.1 * s),
            "throughput/tokens_per_sec": 9000.0 + 50 * (s % 7),
            "throughput/mfu": 0.3,
            "lr-DecoupledAdamW/group0": 8e-4 * min(1.0, s / 20),
        }
        for s in range(1, 101)
    ]
    for row in rows[19::20]:
        row["metrics/eval/LanguageCrossEntropy"] = row["loss/train/total"] + 0.2
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["loss.png", "throughput.png", "lr.png"]
    for path in paths:
        assert path.parent == tmp_path / "plots" and path.stat().st_size > 10_000
        pixels = Image.open(path).convert("L")
        assert pixels.size[0] >= 900 and len(set(pixels.getdata())) > 20  # drawn, not blank


def test_plot_command_reports_a_missing_run(tmp_path, capsys):
    from flexbert.cli import main as cli_main

    assert cli_main(["plot", str(tmp_path)]) == 2
    assert "no metrics file" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "tokens": 0, "time/batch": 1}\n')
    assert cli_main(["plot", str(tmp_path)]) == 2
    assert "nothing to plot" in capsys.readouterr().err


# --- a real Trainer ---------------------------------------------------------------------------


class TinyMLM(ComposerModel):
    def __init__(self, config):
        super().__init__()
        self.net = FlexBertForMaskedLM(config)

    def forward(self, batch):
        return self.net(
            input_ids=batch["input_ids"],
            labels=batch["labels"],
            cu_seqlens=batch["cu_seqlens"],
            max_seqlen=batch["max_seqlen"],
        )

    def loss(self, outputs, batch):
        return outputs.loss


def test_a_tiny_trainer_run_logs_every_metric_to_jsonl(tmp_path):
    config = tiny_config()
    batches = [
        packed_batch([40, 30, 58], 2, 64, seed=0),
        packed_batch([64, 20, 40], 2, 64, seed=1),
        packed_batch([50] * 5, 4, 64, seed=2),
    ]
    data = DataSpec(
        batches,
        get_num_samples_in_batch=lambda b: b["num_rows"],
        get_num_tokens_in_batch=lambda b: len(b["input_ids"]),
        split_batch=lambda b, size: [b],
    )
    logging = LoggingConfig.from_dict({"throughput_window": 2})
    model = TinyMLM(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Composer's notes on unsized dataloaders and the like
        trainer = Trainer(
            model=model,
            train_dataloader=data,
            max_duration="3ba",
            device="cpu",
            device_train_microbatch_size=1,
            optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
            loggers=build_loggers(logging, tmp_path, "tiny"),
            callbacks=build_monitors(logging, config),
            progress_bar=False,
            run_name="tiny",
        )
        trainer.fit()
        trainer.close()

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    assert [row["tokens"] for row in rows] == [0, 128, 252, 502]
    assert all("loss/train/total" in row for row in rows[:3])
    last = rows[-1]
    assert last["batch/rows"] == 4 and last["batch/tokens"] == 250
    assert last["packing/efficiency"] == pytest.approx(250 / 256)
    assert last["packing/efficiency_cumulative"] == pytest.approx(502 / 512)
    assert last["throughput/tokens_per_sec"] > 0 and 0 < last["throughput/mfu"] < 1
    assert last["l2_norm/grad/global"] > 0 and last["lr-AdamW/group0"] == 1e-3
    assert "throughput/tokens_per_sec" in rows[2] and "throughput/tokens_per_sec" not in rows[1]

    assert [p.name for p in plot_run(tmp_path)] == ["loss.png", "throughput.png", "lr.png"]


def test_a_fresh_autoresume_run_logging_to_wandb_starts(tmp_path, no_wandb_key):
    """Composer's autoresume asks each logger for a checkpoint before W&B is initialised; its own W&B
    logger then raised a RuntimeError, so every first run of a recipe with autoresume and W&B crashed."""
    config = tiny_config()
    logging = LoggingConfig.from_dict({"wandb": {"project": "p", "mode": "disabled"}, "progress_bar": False})
    model = TinyMLM(config)
    data = DataSpec(
        [packed_batch([40, 30], 1, 64)],
        get_num_samples_in_batch=lambda b: b["num_rows"],
        get_num_tokens_in_batch=lambda b: len(b["input_ids"]),
        split_batch=lambda b, size: [b],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(
            model=model,
            train_dataloader=data,
            max_duration="1ba",
            device="cpu",
            run_name="fresh",
            device_train_microbatch_size=1,
            optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
            autoresume=True,
            save_folder=str(tmp_path / "checkpoints"),
            loggers=build_loggers(logging, tmp_path, "fresh"),
            progress_bar=False,
        )
        trainer.fit()
        trainer.close()
    assert (tmp_path / "checkpoints" / "latest-rank0.pt").exists()
