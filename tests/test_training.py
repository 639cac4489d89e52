"""Training end to end: recipes, a tiny run, phase chaining, resume, DDP (bad input: test_bad_inputs.py)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import TOKENIZER, run_recipe, tiny_recipe, write_corpus, write_demo_data, write_recipe

from flexbert.train.pretrain import TrainConfig
from flexbert.typed_config import ConfigError
from flexbert.yaml_config import load_yaml_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.xdist_group("streaming")  # see test_remote_streaming.py
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def train(recipe: dict):
    from flexbert.train.pretrain import build_trainer

    trainer = build_trainer(TrainConfig.from_dict(recipe), recipe)
    trainer.fit()
    trainer.close()
    return trainer


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return [row["loss/train/total"] for row in rows if "loss/train/total" in row]


# --- recipes --------------------------------------------------------------------------------------

SPEC = {  # recipe: (preset, seq len, global rows, lr, global theta)
    "pretrain-base": ("modernbert-base", 1024, 4608, 8e-4, 10_000.0),
    "pretrain-large": ("modernbert-large", 1024, 4928, 5e-4, 10_000.0),
    "context-extension-base": ("modernbert-base", 8192, 576, 3e-4, 160_000.0),
    "context-extension-large": ("modernbert-large", 8192, 624, 5e-5, 160_000.0),
    "decay-base": ("modernbert-base", 8192, 576, 3e-4, 160_000.0),
    "decay-large": ("modernbert-large", 8192, 624, 5e-5, 160_000.0),
}


@pytest.mark.parametrize("name", SPEC)
def test_recipes_validate_with_the_spec_numbers(name):
    raw = load_yaml_config(ROOT / "yamls" / f"{name}.yaml", [f"vars.tokenizer_dir={TOKENIZER}", "load_path=null"])
    config = TrainConfig.from_dict(raw, world_size=8)
    preset, seq_len, rows, lr, theta = SPEC[name]
    assert raw["model"]["preset"] == preset
    assert (config.train_loader.max_seq_len, config.global_batch_rows, config.optimizer.lr) == (seq_len, rows, lr)
    assert (config.model_config.global_rope_theta, config.model_config.local_rope_theta) == (theta, 10_000.0)
    assert config.model_config.pad_token_id == 50283
    if name.startswith("decay"):
        assert (config.scheduler.decay_shape, config.scheduler.final_lr_ratio) == ("1-sqrt", 0.001)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """The layout `make demo` writes under vars.data, and a previous phase's checkpoint to name."""
    data = write_demo_data(tmp_path_factory.mktemp("demo") / "data")
    (data / "previous-phase.pt").touch()
    return data


def demo_config(data: Path, phase: str, *overrides: str) -> TrainConfig:
    load = [f"load_path={data / 'previous-phase.pt'}"] if phase != "pretrain" else []
    raw = load_yaml_config(ROOT / "yamls" / "demo" / f"{phase}.yaml", [f"vars.data={data}", *load, *overrides])
    return TrainConfig.from_dict(raw)


def test_demo_recipes_validate_whole_on_the_data_make_demo_builds(demo_data):
    configs = {phase: demo_config(demo_data, phase) for phase in ("pretrain", "context-extension", "decay")}
    pretrain, extension, decay = configs.values()
    # One model through the three phases; only RoPE's global theta changes (to 160k) at extension.
    shape = lambda c: {k: v for k, v in vars(c.model_config).items() if k != "global_rope_theta"}  # noqa: E731
    assert shape(pretrain) == shape(extension) == shape(decay)
    assert [c.model_config.global_rope_theta for c in configs.values()] == [10_000.0, 160_000.0, 160_000.0]
    assert pretrain.model_config.vocab_size == pretrain.tokenizer.vocab_size == 4096
    assert [c.train_loader.max_seq_len for c in configs.values()] == [128, 512, 512]
    assert pretrain.batch_warmup is not None and extension.batch_warmup is None
    assert sorted(pretrain.train_loader.streams) == ["code", "science", "web"]
    assert (decay.scheduler.decay_shape, decay.scheduler.final_lr_ratio, decay.scheduler.decay) == (
        "1-sqrt",
        0.001,
        "1.0dur",
    )
    assert [c.run_dir.path.name for c in configs.values()] == ["demo-pretrain", "demo-context-extension", "demo-decay"]


def masked_pieces(config: TrainConfig, batches: int) -> set[tuple]:
    """(stream, sample, start, masked positions) of each piece in the first ``batches`` batches that
    the run's training loader hands out."""
    from flexbert.data.loader import PackedMLMLoader

    loader = PackedMLMLoader(config.train_loader, config.tokenizer, batch_rows=config.device_microbatch_rows)
    seen = set()
    for batch, _ in zip(loader, range(batches)):
        bounds = batch.host_cu_seqlens.tolist()
        for (stream, sample, start, _end), first, last in zip(batch.piece_keys.tolist(), bounds, bounds[1:]):
            masked = (batch.labels[first:last] != -100).nonzero().flatten().tolist()
            seen.add((stream, sample, start, tuple(masked)))
    return seen


def test_the_data_order_records_of_two_phases_name_different_mask_seeds(corpus, phase1, tmp_path):
    from flexbert.train.data_order import read_data_order

    logged = {"max_duration": "2ba"}  # recorded by default
    for name, load in (("one", {}), ("two", {"load_path": str(phase1 / "checkpoints" / "latest-rank0.pt")})):
        train(tiny_recipe(corpus, tmp_path, run_name=name, **load, **logged))
    seeds = {}
    for name in ("one", "two"):
        lines = read_data_order(tmp_path / name)[0]
        recorded = json.loads((tmp_path / name / "config.json").read_text())["train_loader"]["masking"]["seed"]
        assert [line["step"] for line in lines] == [0, 1] and {line["mask_seed"] for line in lines} == {recorded}
        seeds[name] = recorded
    assert seeds["one"] != seeds["two"]  # so no piece of phase two is masked as in phase one


def test_each_phase_draws_new_samples_and_masks_and_a_rerun_the_same(demo_data):
    phase1 = demo_config(demo_data, "pretrain")
    phase2 = demo_config(demo_data, "context-extension")
    phase3 = demo_config(demo_data, "decay")
    first = masked_pieces(phase1, 6)
    assert not first & masked_pieces(phase2, 6) and not masked_pieces(phase2, 6) & masked_pieces(phase3, 6)
    assert masked_pieces(demo_config(demo_data, "pretrain"), 6) == first  # the same run: the same data
    # Given the first phase's seeds, a later phase replays its pieces with the same masks.
    seeds = [
        f"train_loader.shuffle_seed={phase1.train_loader.shuffle_seed}",
        f"train_loader.masking.seed={phase1.train_loader.masking.seed}",
        "train_loader.max_seq_len=128",
    ]
    assert first & masked_pieces(demo_config(demo_data, "context-extension", *seeds), 6)


def test_the_mmbert_recipes_lower_the_mask_rate_and_temperature_and_add_a_stream(demo_data, tmp_path, capsys):
    """yamls/demo/mmbert-*.yaml, two batches each: pretraining at 30% masks and temperature 0.7 over
    two streams, then the decay from its weights at 0.3 with the third stream, masks falling 15% -> 5%."""
    from flexbert.cli import main as cli_main
    from flexbert.train.loggers import read_metrics

    def phase(name: str, *overrides: str) -> tuple[Path, list[dict]]:
        quick = [f"run_root={tmp_path}", "max_duration=2ba", "eval_loader=null", "logging.progress_bar=false"]
        quick += overrides
        recipe = load_yaml_config(ROOT / "yamls" / "demo" / f"{name}.yaml", [f"vars.data={demo_data}", *quick])
        train(recipe)
        run = tmp_path / recipe["run_name"]
        return run, read_metrics(run)

    def logged(rows: list[dict], prefix: str) -> dict:
        return {key.removeprefix(prefix): value for key, value in rows[0].items() if key.startswith(prefix)}

    pretrain, rows = phase("mmbert-pretrain")
    assert [row.get("batch/mask_rate") for row in rows] == [0.3, 0.3, None]  # (step 2: the monitors' row)
    # Three streams of 4440 tokens each in demo_data: equal counts, equal shares at any temperature.
    assert logged(rows, "data/tokens/") == {"web": 4440, "code": 4440}
    assert logged(rows, "data/proportion/") == {"web": 0.5, "code": 0.5}
    assert list(json.loads((pretrain / "config.json").read_text())["train_loader"]["streams"]) == ["web", "code"]

    decay, rows = phase("mmbert-decay", f"load_path={pretrain / 'checkpoints' / 'latest-rank0.pt'}")
    rates = [row["batch/mask_rate"] for row in rows[:2]]
    assert rates == pytest.approx([0.15, 0.10])  # linear over the phase's 2 batches
    assert logged(rows, "data/proportion/") == pytest.approx({"web": 1 / 3, "code": 1 / 3, "science": 1 / 3})
    out = capsys.readouterr().out
    assert "train_loader: stream proportions proportional to tokens^0.7" in out
    assert "train_loader: stream proportions proportional to tokens^0.3" in out
    assert cli_main(["data-order", str(decay), "--step", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(f", mask rate {rates[1]}")


def test_the_muon_demo_recipe_steps_the_encoder_matrices_by_muon(demo_data, tmp_path):
    """yamls/demo/muon.yaml for three batches: finite losses, and a layer's Wqkv moved as test_muon's
    float64 reference moves it, from the gradients and lrs the run's steps saw (the first two at lr 0:
    Composer steps the schedule before it counts each batch, so the warmup's 0 serves twice)."""
    from test_muon import reference_muon

    from flexbert.train.pretrain import build_trainer

    overrides = [f"vars.data={demo_data}", f"run_root={tmp_path}", "max_duration=3ba", "logging.progress_bar=false"]
    # Newton–Schulz in float32, so that the comparison is tight (test_muon bounds bfloat16's error).
    overrides.append("optimizer.muon.ns_dtype=float32")
    raw = load_yaml_config(ROOT / "yamls" / "demo" / "muon.yaml", overrides)
    trainer = build_trainer(TrainConfig.from_dict(raw), raw)
    matrix = dict(trainer.state.model.named_parameters())["model.model.layers.1.attn.Wqkv.weight"]
    optimizer = trainer.state.optimizers[0]
    starts, lrs, grads = [], [], []

    def before_step(*_) -> None:
        starts.append(matrix.detach().clone())
        lrs.append(optimizer.param_groups[0]["lr"])

    def after_step(*_) -> None:  # Composer hands step() the closure that computes the gradients
        grads.append(matrix.grad.clone())

    optimizer.register_step_pre_hook(before_step)
    optimizer.register_step_post_hook(after_step)
    trainer.fit()
    trainer.close()

    curve = losses(tmp_path / "demo-muon")
    assert len(curve) == 3 and all(math.isfinite(loss) for loss in curve)
    assert optimizer.param_groups[0]["muon"] and any(p is matrix for p in optimizer.param_groups[0]["params"])
    start = starts[0]
    assert matrix.shape == (384, 128) and len(grads) == 3 and lrs[-1] > 0
    expected = reference_muon(
        start, grads, lrs, peak_lr=0.02, momentum=0.95, nesterov=True, weight_decay=2e-4, scale=math.sqrt(3)
    )[-1]
    step, expected_step = matrix.detach().double() - start.double(), expected - start.double()
    assert (step - expected_step).norm() < 1e-4 * expected_step.norm()


# --- a tiny run, then phase 2 from its weights --------------------------------------------------------


@pytest.fixture(scope="module")
def phase1(corpus, tmp_path_factory):
    run_root = tmp_path_factory.mktemp("runs")
    recipe = tiny_recipe(corpus, run_root, max_duration="30ba", save_interval="10ba", save_num_checkpoints_to_keep=2)
    train(recipe)
    return run_root / "tiny"


def test_tiny_run_learns_and_writes_its_run_folder(phase1):
    curve = losses(phase1)
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 1.0
    assert json.loads((phase1 / "config.json").read_text())["run_name"] == "tiny"
    assert (phase1 / "checkpoints" / "latest-rank0.pt").exists()
    assert sorted(p.name for p in (phase1 / "checkpoints").glob("ep*")) == ["ep0-ba20-rank0.pt", "ep0-ba30-rank0.pt"]


def test_a_larger_model_starts_from_a_smaller_one_tiled_and_trains(corpus, phase1, tmp_path, capsys):
    from flexbert.cli import main as cli_main
    from flexbert.core.checkpoint import read_weights
    from flexbert.core.model.tiling import tile_state_dict
    from flexbert.train.loggers import read_metrics
    from flexbert.train.pretrain import build_trainer

    checkpoint = phase1 / "checkpoints" / "latest-rank0.pt"
    wider = {"model.hidden_size": 48, "model.intermediate_size": 64, "model.num_hidden_layers": 3}
    recipe = tiny_recipe(corpus, tmp_path, run_name="larger", init_from={"checkpoint": str(checkpoint)}, **wider)
    trainer = build_trainer(TrainConfig.from_dict(recipe), recipe)
    small_config = TrainConfig.from_dict(json.loads((phase1 / "config.json").read_text())).model_config
    expected = tile_state_dict(read_weights(checkpoint)[0], small_config, trainer.state.model.model.config)
    started = trainer.state.model.model.state_dict()
    assert started.keys() == expected.keys() and all(torch.equal(started[k], expected[k]) for k in expected)
    trainer.close()
    # From the command line, it trains; and it cannot be combined with load_path.
    assert cli_main(["train", str(write_recipe(tmp_path / "larger.yaml", recipe)), "max_duration=3ba"]) == 0
    losses = [row["loss/train/total"] for row in read_metrics(tmp_path / "larger") if "loss/train/total" in row]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    with pytest.raises(ConfigError, match="^init_from: starts the weights afresh"):
        TrainConfig.from_dict({**recipe, "load_path": str(checkpoint)})


def test_phase_two_loads_weights_with_the_new_theta(corpus, phase1, tmp_path):
    from flexbert.train.pretrain import build_trainer

    checkpoint = phase1 / "checkpoints" / "latest-rank0.pt"
    recipe = tiny_recipe(
        corpus,
        tmp_path,
        run_name="phase2",
        load_path=str(checkpoint),
        max_duration="2ba",
        **{"model.global_rope_theta": 160_000.0, "train_loader.max_seq_len": 256},
    )
    trainer = build_trainer(TrainConfig.from_dict(recipe), recipe)
    model = trainer.state.model.model
    saved = torch.load(checkpoint, weights_only=False)["state"]["model"]
    assert all(torch.equal(saved[f"model.{k}"], v) for k, v in model.state_dict().items())
    assert int(trainer.state.timestamp.batch) == 0  # time reset, optimizer fresh
    assert not trainer.state.optimizers[0].state
    # The new theta really applies: the same weights give other outputs under 10k.
    ids = torch.randint(5, 400, (1, 200))
    model.eval()
    with torch.no_grad():
        extended = model(ids).logits
        model.set_rope_theta(global_theta=10_000.0)
        original = model(ids).logits
        model.set_rope_theta(global_theta=160_000.0)
        again = model(ids).logits
    # The forward pass is deterministic on CPU, so any difference is the theta's (the trained tiny
    # model's logits move by about 1e-4; float noise here would be 100 times smaller).
    assert torch.equal(again, extended) and (extended - original).abs().max() > 1e-5


def test_checkpoint_from_another_architecture_is_refused(corpus, phase1, tmp_path):
    from flexbert.train.pretrain import build_trainer

    recipe = tiny_recipe(
        corpus, tmp_path, load_path=str(phase1 / "checkpoints" / "latest-rank0.pt"), **{"model.hidden_size": 64}
    )
    with pytest.raises(ConfigError, match="was saved from a different architecture: model.embeddings"):
        build_trainer(TrainConfig.from_dict(recipe), recipe)


def test_the_architecture_check_reads_only_the_weights_shapes(phase1, tmp_path):
    """A checkpoint whose optimizer state is large: checking it against the model must not load it
    (a large model's checkpoint is several GB, read on every rank before this change)."""
    script = (
        "import resource, sys, torch; from flexbert.core.checkpoint import weight_shapes; "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; shapes = weight_shapes(sys.argv[1]); "
        "print(len(shapes), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)"
    )
    checkpoint = torch.load(phase1 / "checkpoints" / "latest-rank0.pt", weights_only=False)
    checkpoint["state"]["optimizers"]["big"] = torch.ones(150_000_000)  # 600 MB of optimizer state
    big = tmp_path / "big.pt"
    torch.save(checkpoint, big)
    done = subprocess.run([sys.executable, "-c", script, str(big)], capture_output=True, text=True, timeout=120)
    weights, grown_mb = map(int, done.stdout.split())
    assert weights == len(checkpoint["state"]["model"])
    assert grown_mb < 100, grown_mb


def test_autoresume_continues_exactly(corpus, tmp_path):
    full = tiny_recipe(corpus, tmp_path / "a", max_duration="6ba", save_interval="3ba", autoresume=True)
    train(full)
    first_half = tiny_recipe(corpus, tmp_path / "b", max_duration="3ba", save_interval="3ba", autoresume=True)
    train(first_half)
    train(tiny_recipe(corpus, tmp_path / "b", max_duration="6ba", save_interval="3ba", autoresume=True))
    a, b = losses(tmp_path / "a" / "tiny"), losses(tmp_path / "b" / "tiny")
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6
    final = [
        torch.load(tmp_path / d / "tiny" / "checkpoints" / "latest-rank0.pt", weights_only=False)["state"]["model"]
        for d in ("a", "b")
    ]
    assert all(torch.allclose(final[0][k], final[1][k], atol=1e-6, rtol=0) for k in final[0])


# --- DDP -------------------------------------------------------------------------------------------


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    # Every document fills exactly one row, so a step's global batch is the same set of documents
    # whether one process or two build it.
    corpus = write_corpus(tmp_path / "corpus", {"web": [62] * 48, "code": [62] * 48})
    results = {}
    for nproc in (1, 2):
        recipe = tiny_recipe(
            corpus,
            tmp_path / f"runs{nproc}",
            max_duration="8ba",
            save_interval="1000ba",
            global_batch_rows=8,
            device_microbatch_rows=2,
            **{"train_loader.sample_batch_size": 4},
        )
        run_recipe(write_recipe(tmp_path / f"recipe{nproc}.yaml", recipe), nproc)
        results[nproc] = losses(tmp_path / f"runs{nproc}" / "tiny")
    assert len(results[1]) == len(results[2]) == 8
    assert max(abs(a - b) for a, b in zip(results[1], results[2])) <= 1e-5, results


# --- batch-size warmup and SIGTERM ---------------------------------------------------------------------


def test_batch_size_warmup_schedule():
    from flexbert.train.step import BatchSizeSchedule, BatchWarmupConfig

    # ModernBERT-base on 8 GPUs: 768 -> 4608 rows over 50B tokens, microbatches of 96 rows.
    schedule = BatchSizeSchedule(4608, 96, 8, 1024, BatchWarmupConfig(768, "50_000_000_000tok"))
    rows_for_tokens = lambda tokens: schedule(tokens // 1024)  # noqa: E731
    assert rows_for_tokens(0) == 96  # 768 / 8 ranks
    assert rows_for_tokens(25_000_000_000) == 2688 // 8 // 96 * 96  # halfway: 2688 global rows
    assert rows_for_tokens(50_000_000_000) == rows_for_tokens(10**12) == 576
    assert BatchSizeSchedule(4608, 96, 8, 1024, None)(0) == 576


def test_the_rows_of_a_phase_that_a_mask_rate_schedule_runs_over():
    from flexbert.train.step import BatchSizeSchedule, BatchWarmupConfig, phase_rows

    # 2 ranks, microbatches of 4 rows of 128 tokens; the global batch grows from 8 to 32 rows.
    schedule = BatchSizeSchedule(32, 4, 2, 128, BatchWarmupConfig(8, "4_096tok"))
    sizes = []
    for _ in range(10):
        sizes.append(schedule(sum(sizes)) * 2)
    assert sizes[:5] == [8, 8, 16, 32, 32]
    assert [schedule.rows_in(batches) for batches in range(11)] == [sum(sizes[:n]) for n in range(11)]
    assert phase_rows("10ba", schedule) == sum(sizes)
    assert (phase_rows("4_096tok", schedule), phase_rows("100sp", schedule)) == (32, 100)


def test_batch_size_grows_in_a_run(corpus, tmp_path):
    recipe = tiny_recipe(
        corpus,
        tmp_path,
        max_duration="12ba",
        global_batch_rows=8,
        device_microbatch_rows=2,
        batch_warmup={"start_rows": 2, "duration": "2_000tok"},
    )
    train(recipe)
    rows = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").open()]
    sizes = [row["batch/rows"] for row in rows if "batch/rows" in row]
    assert sizes[0] == 2 and sizes[-1] == 8 and sizes == sorted(sizes)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(corpus, tmp_path):
    import signal
    import time

    recipe = write_recipe(
        tmp_path / "recipe.yaml", tiny_recipe(corpus, tmp_path, max_duration="100000ba", save_interval="100000ba")
    )
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), str(recipe)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "tiny" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    saved = list((tmp_path / "tiny" / "checkpoints").glob("ep0-ba*-rank0.pt"))
    assert len(saved) == 1 and 3 <= int(saved[0].name.split("-ba")[1].split("-")[0]) < 100000


def test_hf_export_during_training(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    recipe = tiny_recipe(corpus, tmp_path, max_duration="5ba", hf_export={"interval": "2ba"})
    train(recipe)
    exported = sorted(p.name for p in (tmp_path / "tiny" / "hf").iterdir())
    assert exported == ["ba2", "ba4", "ba5"]
    model, info = transformers.AutoModelForMaskedLM.from_pretrained(
        tmp_path / "tiny" / "hf" / "ba5", output_loading_info=True
    )
    assert not any(info.values())
    final = torch.load(tmp_path / "tiny" / "checkpoints" / "latest-rank0.pt", weights_only=False)["state"]["model"]
    assert torch.equal(model.state_dict()["head.dense.weight"], final["model.head.dense.weight"])
