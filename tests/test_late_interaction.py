"""Late interaction (ColBERT): MaxSim against a plain loop, PyLate's token layout, training on
paraphrase pairs, and retrieval metrics over token vectors."""

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, TOKENIZER, needs_stsb, tiny_config, tiny_stsb_overrides

from flexbert.cli import main
from flexbert.core.checkpoint import RunDir, model_config_for, write_weights
from flexbert.core.colbert import LateInteractionScorer, load_late_interaction
from flexbert.core.model.late_interaction import (
    FlexBertForLateInteraction,
    document_tokens,
    maxsim,
    padded,
    query_tokens,
)
from flexbert.core.model.layout import DocumentLayout
from flexbert.core.tokenizer import load_tokenizer
from flexbert.train.finetune import FinetuneConfig, TaskConfig, build_finetune_trainer, marker_ids, with_marker_ids
from flexbert.train.metrics import Retrieval
from flexbert.typed_config import ConfigError
from flexbert.yaml_config import load_yaml_config

pytestmark = pytest.mark.xdist_group("streaming")  # trains


def test_maxsim_is_each_query_tokens_best_match_summed():
    queries, documents = torch.randn(3, 5, 8), torch.randn(4, 7, 8)
    query_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    document_mask = torch.arange(7)[None, :] < torch.tensor([[7], [2], [5], [1]])
    expected = torch.zeros(3, 4)
    for q in range(3):
        for d in range(4):
            for i in range(int(query_mask[q].sum())):
                expected[q, d] += max(
                    float(queries[q, i] @ documents[d, j]) for j in range(int(document_mask[d].sum()))
                )
    assert torch.allclose(maxsim(queries, query_mask, documents, document_mask), expected, atol=1e-5)


def test_packed_token_vectors_pad_back_per_text():
    vectors = torch.arange(12.0).view(6, 2)
    layout = DocumentLayout.from_cu_seqlens(torch.tensor([0, 1, 4, 6]), None, 6)
    grid, mask = padded(vectors, layout)
    assert grid.shape == (3, 3, 2) and mask.tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 0]]
    assert grid[1].tolist() == vectors[1:4].tolist() and grid[2, :2].tolist() == vectors[4:].tolist()
    assert grid[0, 1:].abs().sum() == 0


def test_markers_and_query_expansion_lay_tokens_out_as_pylate_does():
    cls, sep, q, d, mask = 1, 2, 90, 91, 99
    text = np.array([cls, 10, 11, 12, sep])
    assert query_tokens(text, q, mask, 8).tolist() == [cls, q, 10, 11, 12, sep, mask, mask]
    assert query_tokens(text, q, mask, 5).tolist() == [cls, q, 10, 11, sep]  # cut, [SEP] kept
    assert document_tokens(text, d, 180).tolist() == [cls, d, 10, 11, 12, sep]
    assert document_tokens(text, d, 4).tolist() == [cls, d, 10, sep]


def test_the_model_embeds_each_text_alone_as_in_a_batch():
    model = FlexBertForLateInteraction(tiny_config(), dim=16).eval()
    texts = [torch.randint(3, 256, (n,)) for n in (5, 9, 3)]
    cu_seqlens = torch.tensor([0, 5, 14, 17])
    together, mask = model.embed(torch.cat(texts), cu_seqlens)
    for index, text in enumerate(texts):
        alone, _ = model.embed(text, torch.tensor([0, len(text)]))
        assert torch.allclose(together[index, : len(text)], alone[0], atol=1e-5)
    assert torch.allclose(together[mask].norm(dim=-1), torch.ones(17), atol=1e-5)


def test_retrieval_over_token_vectors_ranks_by_maxsim():
    metric = Retrieval("recall", 1, token_widths=(4, 6))
    queries = torch.nn.functional.normalize(torch.randn(6, 4, 8), dim=-1)
    documents = torch.nn.functional.normalize(torch.randn(6, 6, 8), dim=-1)
    query_mask = torch.ones(6, 4, dtype=torch.bool)
    document_mask = torch.arange(6)[None, :] < torch.tensor([[6], [3], [2], [6], [5], [4]])
    for batch in (slice(0, 4), slice(4, 6)):  # batches narrower than the widths are padded
        width = int(document_mask[batch].sum(dim=1).max())
        metric.update(queries[batch], documents[batch, :width], query_mask[batch], document_mask[batch, :width])
    scores = maxsim(queries, query_mask, documents, document_mask)
    assert metric.compute() == pytest.approx((scores.argmax(dim=1) == torch.arange(6)).float().mean().item())


@needs_stsb
def test_late_interaction_training_retrieves_paraphrases(tmp_path):
    raw = load_yaml_config(
        ROOT / "yamls" / "finetune" / "colbert-stsb.yaml",
        [
            *tiny_stsb_overrides(tmp_path),
            "task.dim=32",
            "max_duration=3ep",
            "train_split.limit=600",
            "optimizer.lr=1e-3",
        ],
    )
    config = FinetuneConfig.from_dict(raw)
    tokenizer = load_tokenizer(TOKENIZER)
    assert marker_ids(tokenizer) == (tokenizer.vocab_size, tokenizer.vocab_size + 1)
    assert config.model_config.vocab_size == max(50368, tokenizer.vocab_size + 2)
    trainer = build_finetune_trainer(config, raw)
    batch = next(iter(trainer.state.train_dataloader))
    first_query = batch["input_ids"][: int(batch["cu_seqlens"][1])]
    assert len(first_query) == 32 and first_query[1] == tokenizer.vocab_size and first_query[-1] == tokenizer.mask_id
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "finetune-colbert-stsb" / "metrics.jsonl").open()]
    recalls = [row["metrics/eval/recall_at_10"] for row in rows if "metrics/eval/recall_at_10" in row]
    pairs = len(trainer.state.evaluators[0].dataloader.dataloader.split.queries)
    print(f"ColBERT STS-B paraphrase retrieval among {pairs} dev pairs, tiny model: recall@10 by epoch {recalls}")
    assert recalls[-1] >= 0.9 and (tmp_path / "finetune-colbert-stsb" / "checkpoints" / "best.pt").is_file()


# --- export to PyLate ---------------------------------------------------------------------------------

QUERIES = ["where does the cat sleep", "a", " ".join(["long query words"] * 20)]  # the last one is cut
DOCUMENTS = [
    "The cat sleeps on the mat in the sun.",
    "Dogs run in the park.",
    " ".join(["a document far longer than the document length"] * 12),  # cut at document_length
    "ok",
]


@pytest.fixture(scope="module")
def late_checkpoint(tmp_path_factory):
    """A late-interaction fine-tune's run folder as training leaves it: config.json and best.pt."""
    run = tmp_path_factory.mktemp("run") / "colbert"
    tokenizer = load_tokenizer(TOKENIZER)
    model_section = {
        "vocab_size": 50368,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 48,
        "local_attention": 8,  # documents span several windows
        "attn_backend": "sdpa",
    }
    task = {
        "kind": "late_interaction",
        "dim": 16,
        "query_length": 12,
        "document_length": 40,
        "metrics": ["recall_at_1"],
    }
    config = with_marker_ids(model_config_for(model_section, tokenizer), tokenizer)
    model = FlexBertForLateInteraction(config, dim=16)
    RunDir(run).write_config({"tokenizer": str(TOKENIZER), "model": model_section, "task": task})
    write_weights(run / "checkpoints" / "best.pt", model.state_dict())
    return run / "checkpoints" / "best.pt"


def test_pylate_loads_the_export_and_scores_as_we_do(late_checkpoint, tmp_path):
    from pylate import models, scores

    out = tmp_path / "pylate"
    assert main(["export-pylate", str(late_checkpoint), str(out)]) == 0
    colbert = models.ColBERT(str(out), device="cpu")
    tokenizer = load_tokenizer(TOKENIZER)
    assert colbert.query_prefix_id == tokenizer.vocab_size and colbert.document_prefix_id == tokenizer.vocab_size + 1
    ours = LateInteractionScorer(load_late_interaction(late_checkpoint), torch.device("cpu"))
    their = {
        "query": colbert.encode(QUERIES, is_query=True, convert_to_tensor=False),
        "document": colbert.encode(DOCUMENTS, is_query=False, convert_to_tensor=False),
    }
    encoded = {"query": ours.encode(QUERIES, "query"), "document": ours.encode(DOCUMENTS, "document")}
    for role, texts in (("query", QUERIES), ("document", DOCUMENTS)):
        vectors, mask = encoded[role]
        for index in range(len(texts)):
            theirs = torch.as_tensor(their[role][index])
            assert theirs.shape == vectors[index][mask[index]].shape, (role, index)
            assert torch.allclose(vectors[index][mask[index]], theirs, atol=1e-5), (role, index)
    assert encoded["query"][1].all() and encoded["document"][1][2].sum() == 40  # expanded; cut
    # PyLate scores each document on its own: its padded batches count padding as similarity 0,
    # which MaxSim over a short document whose real similarities are all negative would not.
    queries = torch.stack([torch.as_tensor(q) for q in their["query"]])
    expected = torch.cat([scores.colbert_scores(queries, torch.as_tensor(d)[None]) for d in their["document"]], dim=1)
    assert torch.allclose(ours.scores(encoded["query"], encoded["document"]), expected, atol=1e-4)


def test_export_pylate_refuses_what_is_not_a_late_interaction_checkpoint(late_checkpoint, tmp_path, capsys):
    other = tmp_path / "plain.pt"
    write_weights(other, FlexBertForLateInteraction(tiny_config()).state_dict())
    for checkpoint, error in (
        (tmp_path / "missing.pt", "model not found"),
        (other, "is not a late-interaction fine-tune's checkpoint"),
    ):
        assert main(["export-pylate", str(checkpoint), str(tmp_path / "out")]) == 2
        printed = capsys.readouterr().err
        assert error in printed and printed.count("\n") == 1
    # And the commands that take a pretrained (masked-LM) checkpoint say what this one is.
    assert main(["export-hf", str(late_checkpoint), str(tmp_path / "hf")]) == 2
    assert "was saved by a fine-tuning run" in capsys.readouterr().err
    assert main(["export-pylate", str(late_checkpoint), str(tmp_path / "out")]) == 0
    assert main(["export-pylate", str(late_checkpoint), str(tmp_path / "out")]) == 2  # exists: --overwrite
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "plain.pt"]  # nothing half-written


def test_eval_retrieval_ranks_a_late_interaction_model_by_maxsim(late_checkpoint, tmp_path, capsys):
    from test_retrieval import brute_force_metrics, small_split

    from flexbert.data.retrieval_tasks import write_split

    queries, documents = QUERIES, DOCUMENTS[:3]
    write_split(tmp_path / "task" / "eval", small_split(queries, documents, [[0], [1], [2]]))
    out = tmp_path / "results.json"
    assert main(["eval-retrieval", str(late_checkpoint), "--task", str(tmp_path / "task"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["scoring"] == "late interaction, MaxSim" and "MaxSim" in capsys.readouterr().out
    # The reference: each text embedded on its own, MaxSim summed token by token.
    late = load_late_interaction(late_checkpoint)
    alone = {
        role: [LateInteractionScorer(late, torch.device("cpu")).encode([text], role) for text in texts]
        for role, texts in (("query", queries), ("document", documents))
    }
    scores = [
        [sum(max(float(q @ d) for d in dv[0][dm[0]]) for q in qv[0][qm[0]]) for dv, dm in alone["document"]]
        for qv, qm in alone["query"]
    ]
    expected = brute_force_metrics(scores, [{0: 1}, {1: 1}, {2: 1}])
    assert report["metrics"] == pytest.approx(expected, abs=1e-6)


# --- hard negatives ----------------------------------------------------------------------------------


def write_triples(path, count: int) -> None:
    words = "cat dog sun mat park red blue fast slow tree".split()
    rows = [
        {"query": f"{words[i % 10]} {words[(i + 3) % 10]}", "positive": f"a {words[i % 10]}", "negative": "the end"}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.parametrize("kind", ["embedding", "late_interaction"])
def test_hard_negatives_join_each_querys_candidates(kind, tmp_path):
    """Trained on (query, positive, negative) triples, a batch holds B queries, B positives and B
    negatives, and its loss is cross-entropy over each query's scores against all 2B documents."""
    from flexbert.core.model import FlexBertForSentenceEmbedding

    write_triples(tmp_path / "triples.jsonl", 12)
    split = {"path": str(tmp_path / "triples.jsonl"), "text_columns": ["query", "positive", "negative"]}
    raw = {
        "run_name": "triples",
        "run_root": str(tmp_path),
        "tokenizer": str(TOKENIZER),
        "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48},
        "task": {"kind": kind, "dim": 16, "query_length": 8, "document_length": 16, "metrics": ["recall_at_1"]},
        "train_split": split,
        "eval_splits": {"eval": split},
        "batch_size": 4,
        "max_duration": "2ba",
        "logging": {"progress_bar": False},
    }
    trainer = build_finetune_trainer(FinetuneConfig.from_dict(raw), raw)
    batch = next(iter(trainer.state.train_dataloader))
    assert batch["num_queries"] == 4 and len(batch["cu_seqlens"]) == 13  # 4 queries, 4 positives, 4 negatives
    model = trainer.state.model.model.eval()
    texts = [batch["input_ids"][start:end] for start, end in zip(batch["cu_seqlens"][:-1], batch["cu_seqlens"][1:])]
    # The reference: every text embedded on its own, scored against all 8 documents.
    with torch.no_grad():
        if isinstance(model, FlexBertForSentenceEmbedding):
            vectors = [model.embed(text, cu_seqlens=torch.tensor([0, len(text)]))[0] for text in texts]
            scores = torch.stack([torch.stack([q @ d for d in vectors[4:]]) for q in vectors[:4]])
        else:
            alone = [model.embed(text, torch.tensor([0, len(text)])) for text in texts]
            scores = torch.stack(
                [torch.stack([maxsim(q, qm, d, dm)[0, 0] for d, dm in alone[4:]]) for q, qm in alone[:4]]
            )
        expected = torch.nn.functional.cross_entropy(scores / model.temperature, torch.arange(4))
        output = model(batch["input_ids"], batch["cu_seqlens"], batch["max_seqlen"], batch["num_queries"])
    assert output.logits.shape == (4, 8) and torch.allclose(output.loss, expected, atol=1e-5)
    trainer.fit()  # and it trains, evaluating each query's positive among the split's positives
    trainer.close()


# --- distillation ------------------------------------------------------------------------------------


def test_distillation_learns_the_teachers_distribution_over_each_querys_candidates(tmp_path):
    """A batch holds B queries, then each one's k candidates; the loss is the KL divergence from the
    softmax of the teacher's scores to that of the student's MaxSim scores of its own candidates."""
    words = "cat dog sun mat park red blue fast slow tree".split()
    rows = [
        {
            "query": f"{words[i % 10]} {words[(i + 1) % 10]}",
            "documents": [f"a {w}" for w in words[:3]],
            "scores": [3.0, 1.0, float(i % 4)],
        }
        for i in range(8)
    ]
    (tmp_path / "distil.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_triples(tmp_path / "pairs.jsonl", 8)
    raw = {
        "run_name": "distil",
        "run_root": str(tmp_path),
        "tokenizer": str(TOKENIZER),
        "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48},
        "task": {
            "kind": "late_interaction",
            "loss": "distillation",
            "dim": 16,
            "query_length": 8,
            "document_length": 16,
            "metrics": ["recall_at_1"],
        },
        "train_split": {
            "path": str(tmp_path / "distil.jsonl"),
            "text_columns": ["query", "documents"],
            "label_column": "scores",
        },
        "eval_splits": {"eval": {"path": str(tmp_path / "pairs.jsonl"), "text_columns": ["query", "positive"]}},
        "batch_size": 4,
        "max_duration": "2ba",
        "logging": {"progress_bar": False},
    }
    trainer = build_finetune_trainer(FinetuneConfig.from_dict(raw), raw)
    batch = next(iter(trainer.state.train_dataloader))
    assert batch["num_queries"] == 4 and len(batch["cu_seqlens"]) == 4 + 4 * 3 + 1
    model = trainer.state.model.model.eval()
    texts = [batch["input_ids"][start:end] for start, end in zip(batch["cu_seqlens"][:-1], batch["cu_seqlens"][1:])]
    with torch.no_grad():
        alone = [model.embed(text, torch.tensor([0, len(text)])) for text in texts]
        student = torch.stack(
            [torch.stack([maxsim(*alone[q], *alone[4 + 3 * q + c])[0, 0] for c in range(3)]) for q in range(4)]
        )
        teacher = torch.softmax(batch["teacher_scores"], dim=-1)
        expected = (teacher * (teacher.log() - torch.log_softmax(student, dim=-1))).sum(dim=-1).mean()
        output = model(batch["input_ids"], batch["cu_seqlens"], batch["max_seqlen"], 4, batch["teacher_scores"])
    assert output.logits.shape == (4, 3) and torch.allclose(output.loss, expected, atol=1e-5)
    trainer.fit()
    trainer.close()


def test_bad_distillation_rows_are_one_line(tmp_path):
    from flexbert.data.labeled import LabeledDataError, SplitConfig, load_distillation_split

    tokenizer = load_tokenizer(TOKENIZER)
    cases = [
        ({"query": "q", "documents": ["a", "b"], "scores": [1.0]}, "row 2: 2 documents and 1 scores"),
        ({"query": "q", "documents": "a", "scores": [1.0]}, "'documents' must be a non-empty list of texts"),
        ({"query": "q", "documents": ["a"], "scores": [1.0]}, "row 2: 1 documents and 1 scores; every row needs 2"),
    ]
    for bad, error in cases:
        good = {"query": "q", "documents": ["a", "b"], "scores": [1.0, 0.0]}
        (tmp_path / "rows.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        config = SplitConfig(str(tmp_path / "rows.jsonl"), ["query", "documents"], "scores")
        with pytest.raises(LabeledDataError, match=error):
            load_distillation_split(config, tokenizer, 64)
    with pytest.raises(ConfigError, match="task.loss: distillation trains late-interaction models"):
        TaskConfig(metrics=["recall_at_1"], kind="embedding", loss="distillation").validate("task")
