"""Phase 3: fine-tuning on labelled text: synthetic data, and real GLUE STS-B where ../shared has it."""

import json
import warnings
from pathlib import Path

import pytest
import torch
import torchmetrics
from conftest import ROOT, STSB, TOKENIZER, needs_stsb, tiny_stsb_overrides

from flexbert.core.tokenizer import load_tokenizer
from flexbert.data.labeled import LabeledDataError, SplitConfig, batches, load_split
from flexbert.train.finetune import FinetuneConfig, build_finetune_trainer, epoch_fraction, eval_interval_in_batches
from flexbert.typed_config import ConfigError
from flexbert.yaml_config import load_yaml_config

pytestmark = [
    # Training runs share one xdist group (see test_remote_streaming.py): two at once on 2 cores
    # oversubscribe torch's threads and each runs many times slower.
    pytest.mark.xdist_group("streaming")
]


@needs_stsb
def test_stsb_fine_tuning_beats_the_constant_baseline(tmp_path):
    raw = load_yaml_config(
        ROOT / "yamls" / "finetune" / "stsb.yaml",
        [
            *tiny_stsb_overrides(tmp_path),
            "train_split.limit=1200",
            "eval_splits.eval.limit=400",
            "max_duration=4ep",
            "batch_size=32",
            "optimizer.lr=1e-3",
        ],
    )
    trainer = build_finetune_trainer(FinetuneConfig.from_dict(raw), raw)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "finetune-stsb" / "metrics.jsonl").open()]
    final = [row for row in rows if "metrics/eval/spearman" in row][-1]
    spearman, pearson = final["metrics/eval/spearman"], final["metrics/eval/pearson"]
    print(f"STS-B dev (400 pairs), tiny model from scratch: Spearman {spearman:.3f}, Pearson {pearson:.3f}")
    # A constant prediction has no correlation with the gold scores at all.
    assert spearman >= 0.2 and pearson >= 0.2  # docs/finetuning.md quotes this run: Spearman 0.235


@needs_stsb
def test_labelled_splits_and_batches():
    tokenizer = load_tokenizer(TOKENIZER)
    split = load_split(
        SplitConfig(str(STSB / "dev.tsv"), ["sentence1", "sentence2"], "score", limit=50),
        tokenizer,
        num_labels=1,
        max_seq_len=128,
    )
    assert split.labels.dtype == torch.float32 and len(split.token_ids) == 50
    first = split.token_ids[0]
    assert first[0] == tokenizer.cls_id and first[-1] == tokenizer.sep_id
    assert (first == tokenizer.sep_id).sum() == 2  # [CLS] A [SEP] B [SEP]
    batch = next(batches(split, 8, shuffle=False, seed=0))
    assert batch["cu_seqlens"][-1] == batch["input_ids"].shape[0] and batch["labels"].shape == (8,)


def test_bad_labelled_input(tmp_path):
    tokenizer = load_tokenizer(TOKENIZER)
    data = tmp_path / "data.jsonl"
    data.write_text('{"sentence": "a b c", "label": 1}\n{"sentence": "d e", "label": 7}\n')
    with pytest.raises(LabeledDataError, match="no column 'target'"):
        load_split(SplitConfig(str(data), label_column="target"), tokenizer, 2, 64)
    with pytest.raises(LabeledDataError, match=r"label 7 is outside \[0, num_labels=2\)"):
        load_split(SplitConfig(str(data)), tokenizer, 2, 64)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(LabeledDataError, match="holds no examples"):
        load_split(SplitConfig(str(empty)), tokenizer, 2, 64)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"sentence": "word " * 200, "label": 0}) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = load_split(SplitConfig(str(long)), tokenizer, 2, 64)
    assert split.truncated == 1 and len(split.token_ids[0]) == 64 and split.token_ids[0][-1] == tokenizer.sep_id
    assert any("1 of 1 texts" in str(w.message) for w in caught)


def test_fine_tuning_starts_from_our_checkpoint_or_an_hf_directory(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_config

    from flexbert.core.hf import export_hf
    from flexbert.core.model import FlexBertForMaskedLM, FlexBertForSequenceClassification
    from flexbert.train.finetune import load_pretrained
    from flexbert.typed_config import ConfigError

    pretrained = FlexBertForMaskedLM(tiny_config())
    checkpoint = tmp_path / "mlm.pt"
    torch.save({"state": {"model": {f"model.{k}": v for k, v in pretrained.state_dict().items()}}}, checkpoint)
    export_hf(pretrained, tmp_path / "hf")
    for source in (checkpoint, tmp_path / "hf"):
        classifier = FlexBertForSequenceClassification(tiny_config(), num_labels=3)
        load_pretrained(classifier, str(source))
        for name, tensor in classifier.state_dict().items():
            if not name.startswith("classifier."):
                assert torch.equal(tensor, pretrained.state_dict()[name]), (source, name)
    with pytest.raises(ConfigError, match="different architecture"):
        load_pretrained(
            FlexBertForSequenceClassification(tiny_config(hidden_size=32, num_attention_heads=2), 3), str(checkpoint)
        )


GLUE_METRICS = {
    "cola": ["mcc"],
    "sst2": ["accuracy"],
    "mrpc": ["accuracy", "f1"],
    "stsb": ["pearson", "spearman"],
    "qqp": ["accuracy", "f1"],
    "mnli": ["accuracy"],
    "qnli": ["accuracy"],
    "rte": ["accuracy"],
}


@pytest.mark.parametrize("task", GLUE_METRICS)
def test_glue_recipes_use_the_official_metrics(task):
    config = FinetuneConfig.from_dict(load_yaml_config(ROOT / "yamls" / "finetune" / f"{task}.yaml"))
    assert config.task.metrics == GLUE_METRICS[task]
    assert config.optimizer.name == "decoupled_adamw"
    assert (config.scheduler.warmup, config.scheduler.decay_shape) == ("0.1dur", "linear")
    assert (config.task.num_labels == 1) == (task == "stsb")
    if task == "mnli":
        assert set(config.eval_splits) == {"matched", "mismatched"}


@pytest.mark.parametrize(
    "recipe",
    [path for path in sorted((ROOT / "yamls" / "finetune").glob("*.yaml")) if path.name != "glue.yaml"],  # an include
    ids=lambda path: path.name,
)
def test_every_fine_tuning_recipe_validates(recipe):
    """Each shipped recipe builds its config, and its metrics build for its task (data aside)."""
    from flexbert.train.finetune import METRICS

    config = FinetuneConfig.from_dict(load_yaml_config(recipe, [f"tokenizer={TOKENIZER}"]))
    metrics = {name: METRICS[name](config.task) for name in config.task.metrics}
    assert metrics and all(isinstance(metric, torchmetrics.Metric) for metric in metrics.values())


def test_headerless_tsv_with_named_columns(tmp_path):
    cola = tmp_path / "train.tsv"
    cola.write_text(
        "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\ngj04\t0\t*\tThe more we study verbs.\n"
    )
    split = load_split(
        SplitConfig(str(cola), ["sentence"], header=["source", "label", "original_label", "sentence"]),
        load_tokenizer(TOKENIZER),
        num_labels=2,
        max_seq_len=64,
    )
    assert split.labels.tolist() == [1, 0] and len(split.token_ids) == 2


# --- token classification (NER) -------------------------------------------------------------------


def test_entity_spans_and_f1():
    from flexbert.train.metrics import EntityF1, entity_spans

    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "I-PER", "B-PER"]) == {
        (0, 2, "PER"),
        (3, 5, "LOC"),
        (5, 6, "PER"),
        (6, 7, "PER"),
    }
    names = ["O", "B-PER", "I-PER", "B-LOC"]
    metric = EntityF1(names)
    labels = torch.tensor([-100, 1, 2, -100, 0, 3, -100, -100, 1, 0, -100])
    guess = torch.tensor([0, 1, 2, 2, 0, 0, 0, 0, 1, 3, 0])  # 2 of 3 gold entities, 1 spurious
    metric.update(guess, labels, torch.tensor([0, 7, 11]))
    assert metric.compute().item() == pytest.approx(2 / 3)


def write_conll(path: Path, sentences: int, seed: int) -> Path:
    import random

    rng = random.Random(seed)
    people, places, filler = (
        ["Alice", "Bob", "Carol", "Dave"],
        ["Paris", "Berlin", "Rome"],
        ["met", "in", "the", "at", "today"],
    )
    lines = ["-DOCSTART- -X- O O", ""]
    for _ in range(sentences):
        words = []
        for _ in range(rng.randint(4, 9)):
            kind = rng.random()
            if kind < 0.2:
                words += (
                    [(rng.choice(people), "B-PER"), ("Smith", "I-PER")]
                    if rng.random() < 0.5
                    else [(rng.choice(people), "B-PER")]
                )
            elif kind < 0.35:
                words.append((rng.choice(places), "B-LOC"))
            else:
                words.append((rng.choice(filler), "O"))
        lines += [f"{word} NNP O {tag}" for word, tag in words] + [""]
    path.write_text("\n".join(lines))
    return path


def ner_recipe(tmp_path: Path, train: Path, valid: Path, *overrides: str) -> dict:
    """yamls/finetune/ner-conll.yaml on synthetic CoNLL files, for a tiny model trained from scratch."""
    return load_yaml_config(
        ROOT / "yamls" / "finetune" / "ner-conll.yaml",
        [
            f"tokenizer={TOKENIZER}",
            f"run_root={tmp_path}",
            f"train_split.path={train}",
            f"eval_splits.eval.path={valid}",
            "task.num_labels=5",
            "task.label_names=[O,B-PER,I-PER,B-LOC,I-LOC]",
            "model.hidden_size=64",
            "model.num_hidden_layers=2",
            "model.num_attention_heads=4",
            "model.intermediate_size=96",
            "model.attn_backend=sdpa",
            "batch_size=16",
            "optimizer.lr=2e-3",
            "logging.progress_bar=false",
            *overrides,
        ],
    )


def test_ner_fine_tuning_learns_entities(tmp_path):
    train = write_conll(tmp_path / "train.txt", 300, seed=0)
    valid = write_conll(tmp_path / "valid.txt", 60, seed=1)
    raw = ner_recipe(tmp_path, train, valid, "max_duration=6ep")
    trainer = build_finetune_trainer(FinetuneConfig.from_dict(raw), raw)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "finetune-ner" / "metrics.jsonl").open()]
    f1 = [row for row in rows if "metrics/eval/entity_f1" in row][-1]["metrics/eval/entity_f1"]
    print(f"synthetic NER, tiny model from scratch: entity F1 {f1:.3f}")
    assert f1 > 0.8


# --- sentence embeddings --------------------------------------------------------------------------


def test_retrieval_metrics():
    from flexbert.train.metrics import Retrieval

    queries = torch.eye(4)
    positives = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])  # 2 and 3 swapped
    values = {}
    for kind, k in (("recall", 1), ("recall", 2), ("ndcg", 2)):
        metric = Retrieval(kind, k)
        metric.update(queries[:2], positives[:2])
        metric.update(queries[2:], positives[2:])
        values[kind, k] = metric.compute().item()
    # Queries 1 and 2 rank their positive second (ties count against the positive only when higher).
    assert values["recall", 1] == pytest.approx(0.5) and values["recall", 2] == pytest.approx(1.0)
    assert values["ndcg", 2] == pytest.approx((1 + 1 / 1.5849625 * 2 + 1) / 4, rel=1e-5)


@needs_stsb
def test_embedding_training_retrieves_paraphrases(tmp_path):
    raw = load_yaml_config(
        ROOT / "yamls" / "finetune" / "embeddings-stsb.yaml",
        [
            *tiny_stsb_overrides(tmp_path),
            "max_duration=3ep",
            "batch_size=32",
            "train_split.limit=600",
            "optimizer.lr=1e-3",
        ],
    )
    trainer = build_finetune_trainer(FinetuneConfig.from_dict(raw), raw)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "finetune-embeddings-stsb" / "metrics.jsonl").open()]
    final = [row for row in rows if "metrics/eval/recall_at_10" in row][-1]
    pairs = len(trainer.state.evaluators[0].dataloader.dataloader.split.queries)
    recall, ndcg = final["metrics/eval/recall_at_10"], final["metrics/eval/ndcg_at_10"]
    print(
        f"STS-B paraphrase retrieval among {pairs} dev pairs, tiny model from scratch: "
        f"recall@10 {recall:.3f} (chance {10 / pairs:.3f}), nDCG@10 {ndcg:.3f}"
    )
    assert recall >= 0.9 and ndcg >= 0.8  # docs/finetuning.md quotes this run: recall@10 0.94 (chance 0.04)


def test_labelled_split_from_a_saved_hf_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["good film", "bad film", "fine"], "label": [1, 0, 1]}).save_to_disk(
        str(tmp_path / "saved")
    )
    split = load_split(SplitConfig(str(tmp_path / "saved"), ["text"], "label"), load_tokenizer(TOKENIZER), 2, 64)
    assert split.labels.tolist() == [1, 0, 1] and len(split.token_ids) == 3


@pytest.mark.parametrize("action", ["stop", "skip"])
def test_the_nan_guard_stops_or_skips_a_fine_tuning_step(tmp_path, action):
    from test_resume import Poison

    from flexbert.train.nan_guard import NonFiniteTrainingError

    train = write_conll(tmp_path / "train.txt", 40, seed=0)
    raw = ner_recipe(tmp_path, train, train, "max_duration=4ba", "batch_size=8", f"nan_guard.action={action}")
    trainer = build_finetune_trainer(FinetuneConfig.from_dict(raw), raw)
    poison = Poison(2, "loss")
    trainer.state.callbacks.insert(0, poison)
    record = tmp_path / "finetune-ner" / "nan_guard.jsonl"
    if action == "stop":
        with pytest.raises(NonFiniteTrainingError, match=rf"^nan_guard: step 2 has a NaN .* 8 examples of {train}"):
            trainer.fit()
        assert "after 2" not in poison.weights  # stopped before the optimizer step
    else:
        with pytest.warns(RuntimeWarning, match=r"nan_guard: step 2 has .* skipped its optimizer step"):
            trainer.fit()
        before, after = poison.weights["before 2"], poison.weights["after 2"]
        assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
        assert int(trainer.state.timestamp.batch) == 4  # and it trained on
    trainer.close()
    entry = json.loads(record.read_text())
    assert entry["step"] == 2 and entry["action"] == action and len(entry["examples_per_rank"][0]) == 8


def test_early_stopping_keeps_the_best_evaluation_and_a_next_task_starts_from_it(tmp_path):
    from composer.core import Callback

    from flexbert.core.checkpoint import read_weights
    from flexbert.train.loggers import read_metrics
    from flexbert.train.step import flexbert_module

    class Snapshots(Callback):  # runs after the guard's own callbacks: the weights each evaluation saw
        def __init__(self):
            self.weights = []

        def eval_end(self, state, logger):
            state_dict = flexbert_module(state.model).state_dict()
            self.weights.append({name: tensor.clone() for name, tensor in state_dict.items()})

    train = write_conll(tmp_path / "train.txt", 120, seed=0)
    valid = write_conll(tmp_path / "valid.txt", 40, seed=1)
    raw = ner_recipe(tmp_path, train, valid, "max_duration=30ep", "early_stopping={patience: 1}")
    trainer = build_finetune_trainer(FinetuneConfig.from_dict(raw), raw)
    snapshots = Snapshots()
    trainer.state.callbacks.append(snapshots)
    trainer.fit()
    trainer.close()
    rows = read_metrics(tmp_path / "finetune-ner")
    scores = [row["metrics/eval/entity_f1"] for row in rows if "metrics/eval/entity_f1" in row]
    best = max(scores)
    # Stopped one evaluation after the best one, long before 30 epochs.
    assert len(scores) < 30 and scores.index(best) == len(scores) - 2 and scores[-1] <= best
    assert [row["metrics/eval/best_entity_f1"] for row in rows if "metrics/eval/best_entity_f1" in row][-1] == best
    saved, _ = read_weights(tmp_path / "finetune-ner" / "checkpoints" / "best.pt")
    at_best = snapshots.weights[scores.index(best)]
    assert saved.keys() == at_best.keys() and all(torch.equal(saved[name], at_best[name]) for name in saved)
    # A next task starts from it, as GLUE starts RTE from MNLI: everything but the new classifier.
    best_path = tmp_path / "finetune-ner" / "checkpoints" / "best.pt"
    raw = ner_recipe(tmp_path, train, valid, "run_name=next", f"load_path={best_path}")
    started = flexbert_module(build_finetune_trainer(FinetuneConfig.from_dict(raw), raw).state.model).state_dict()
    assert all(torch.equal(started[name], saved[name]) for name in saved if not name.startswith("classifier."))
    assert not torch.equal(started["classifier.weight"], saved["classifier.weight"])


def test_a_part_of_an_epoch_as_eval_interval_evaluates_within_each_epoch(tmp_path):
    """``eval_interval: 0.25ep`` evaluates four times an epoch (at every quarter's last batch), so that
    early stopping can act within a run of one to three epochs, as GLUE's protocol needs."""
    from flexbert.train.loggers import read_metrics

    train = write_conll(tmp_path / "train.txt", 128, seed=0)  # 8 batches of 16 per epoch
    valid = write_conll(tmp_path / "valid.txt", 16, seed=1)
    raw = ner_recipe(tmp_path, train, valid, "max_duration=2ep", "eval_interval=0.25ep")
    trainer = build_finetune_trainer(FinetuneConfig.from_dict(raw), raw)
    trainer.fit()
    trainer.close()
    rows = read_metrics(tmp_path / "finetune-ner")
    assert [row["step"] for row in rows if "metrics/eval/entity_f1" in row] == [2, 4, 6, 8, 10, 12, 14, 16]


def test_eval_intervals_in_epochs_become_batches():
    assert eval_interval_in_batches("0.25ep", 8) == "2ba"
    assert eval_interval_in_batches("0.1ep", 4) == "1ba"  # at least one batch
    assert eval_interval_in_batches("2ep", 8) == "2ep"  # whole epochs: Composer counts them itself
    assert eval_interval_in_batches("1_000ba", 8) == "1000ba"
    assert [epoch_fraction(text) for text in ("0.25ep", ".5ep", "3ep", "100ba", "ep")] == [0.25, 0.5, 3.0, None, None]


@pytest.mark.parametrize("interval", ["0ep", "0.0ep", "0.25 epochs", "-1ep"])
def test_a_bad_eval_interval_stops_with_one_line(tmp_path, interval):
    train = write_conll(tmp_path / "train.txt", 16, seed=0)
    raw = ner_recipe(tmp_path, train, train, f"eval_interval={interval}")
    with pytest.raises(ConfigError, match=r"^eval_interval: "):
        FinetuneConfig.from_dict(raw)
