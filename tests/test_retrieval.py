"""Retrieval evaluation offline: the benchmarks' builders (code search from installed packages, STS-B
paraphrases), the ranking metrics against hand-computed values and a brute-force reference, and
``flexbert eval-retrieval`` end to end on a tiny random model."""

import ast
import dataclasses
import json
import math
import random
from collections import Counter
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import STSB, STSB_COLUMNS, TOKENIZER, needs_stsb, tiny_config

from flexbert.cli import main
from flexbert.core.atomic_output import OutputExistsError
from flexbert.core.beir import RetrievalSplit, RetrievalTaskError, read_split, write_split
from flexbert.core.checkpoint import MODEL_CONFIG_KEY, write_weights
from flexbert.core.embedders import load_embedder
from flexbert.core.model import FlexBertForMaskedLM
from flexbert.core.retrieval import CUTOFFS, evaluate, ranking_metrics
from flexbert.core.tokenizer import load_tokenizer
from flexbert.data.retrieval_tasks import (
    DEFAULT_PACKAGES,
    MAX_DOCUMENT_CHARS,
    MAX_QUERY_CHARS,
    MIN_DOCUMENT_LINES,
    MIN_QUERY_WORDS,
    Package,
    build_code_search,
    build_stsb,
    deduplicated,
    package_pairs,
    site_packages_holding,
    stsb_rows,
)
from flexbert.train.metrics import Retrieval

# Small dependencies of flexbert, so that a build takes a second; the cap cuts the train split.
SMALL_PACKAGES = {
    "train": (Package("tqdm", "tqdm"), Package("omegaconf", "omegaconf")),
    "eval": (Package("safetensors", "safetensors"), Package("tokenizers", "tokenizers")),
}
SMALL_CAPS = {"train": 40, "eval": 1000}


def file_bytes(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def build_small(output: Path, seed: int = 0) -> dict:
    return build_code_search(output, seed, SMALL_PACKAGES, SMALL_CAPS, progress=False)


@pytest.fixture(scope="module")
def code_search(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("code") / "task"
    build_small(output)
    return output


# --- code search ------------------------------------------------------------------------------------


def test_code_search_rebuilds_byte_identical_and_the_seed_draws_the_capped_split(code_search, tmp_path):
    build_small(tmp_path / "again")
    assert file_bytes(tmp_path / "again") == file_bytes(code_search)
    build_small(tmp_path / "seed1", seed=1)
    other = file_bytes(tmp_path / "seed1")
    assert other["train/queries.jsonl"] != file_bytes(code_search)["train/queries.jsonl"]
    assert other["eval/queries.jsonl"] == file_bytes(code_search)["eval/queries.jsonl"]  # under its cap: all of it


def test_code_search_holds_out_whole_packages_and_its_manifest_counts_them(code_search):
    manifest = json.loads((code_search / "manifest.json").read_text())
    for name, packages in SMALL_PACKAGES.items():
        assert manifest["packages"][name] == {p.distribution: metadata.version(p.distribution) for p in packages}
        split = read_split(code_search, name)
        folders = {query_id.removeprefix("q:").split("/")[0] for query_id in split.queries}
        assert folders == {package.module for package in packages}  # every package gives pairs, no other does
        assert manifest["splits"][name] == split.counts()
        # Each query's one relevant document, under an id that no query has (BEIR's evaluator would
        # drop a pair of equal ids).
        assert split.qrels == {query_id: {"d:" + query_id.removeprefix("q:"): 1} for query_id in split.queries}
        assert (
            all(query_id.startswith("q:") for query_id in split.queries)
            and not split.queries.keys() & split.corpus.keys()
        )
    assert manifest["splits"]["train"]["queries"] == SMALL_CAPS["train"]
    assert manifest["dropped"]["over the cap"] > 0


def test_code_search_has_no_duplicate_document_or_query(code_search):
    splits = [read_split(code_search, name) for name in SMALL_PACKAGES]
    documents = [text for split in splits for text in split.corpus.values()]
    bodies = [ast.unparse(ast.parse(text)) for text in documents]  # comments and layout aside
    queries = [" ".join(text.lower().split()) for split in splits for text in split.queries.values()]
    assert len(set(documents)) == len(set(bodies)) == len(documents)
    assert len(set(queries)) == len(queries)


def test_each_split_pairs_the_texts_its_qrels_judge_relevant_for_fine_tuning(code_search, tmp_path):
    from flexbert.data.labeled import SplitConfig, load_pair_split

    tokenizer = load_tokenizer(TOKENIZER)
    for name in SMALL_PACKAGES:
        split = read_split(code_search, name)
        pairs = [json.loads(line) for line in (code_search / name / "pairs.jsonl").read_text().splitlines()]
        judged = [(split.queries[q], split.corpus[d]) for q, relevant in split.qrels.items() for d in relevant]
        assert [(pair["query"], pair["document"]) for pair in pairs] == judged
        # As a fine-tune reads it: one (query, positive) example per pair.
        loaded = load_pair_split(
            SplitConfig(str(code_search / name / "pairs.jsonl"), ["query", "document"]), tokenizer, 512
        )
        assert len(loaded.queries) == len(judged)


def installed_function(pair_id: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    """The function a pair was taken from, found again in the installed source by its id (the first
    with that name and a docstring: typing's @overload stubs come before the function, without one)."""
    path, qualified_name = pair_id.split(":")
    package = Package(path.split("/")[0], path.split("/")[0])
    scope = ast.parse((site_packages_holding(package) / path).read_bytes())
    *classes, function = qualified_name.split(".")
    for name in classes:
        scope = next(node for node in scope.body if isinstance(node, ast.ClassDef) and node.name == name)
    return next(node for node in scope.body if getattr(node, "name", None) == function and ast.get_docstring(node))


def test_a_document_is_its_function_without_the_docstring_and_the_query_opens_that_docstring(code_search):
    for name in SMALL_PACKAGES:
        split = read_split(code_search, name)
        for document_id, document in split.corpus.items():
            pair_id = document_id.removeprefix("d:")
            stripped = ast.parse(document).body[0]
            assert isinstance(stripped, (ast.FunctionDef, ast.AsyncFunctionDef))
            assert ast.get_docstring(stripped) is None
            original = installed_function(pair_id)
            docstring = ast.get_docstring(original)
            original.body, original.decorator_list = original.body[1:], []
            assert ast.dump(stripped) == ast.dump(original)
            query = split.queries["q:" + pair_id]
            assert " ".join(docstring.split()).startswith(" ".join(query.split()))
            assert MIN_QUERY_WORDS <= len(query.split()) and len(query) <= MAX_QUERY_CHARS
            assert MIN_DOCUMENT_LINES <= len(document.split("\n")) and len(document) <= MAX_DOCUMENT_CHARS
            assert not any(word.startswith("test") for word in stripped.name.lower().split("_"))
            assert not (stripped.name.startswith("__") and stripped.name.endswith("__"))


MODULE_A = '''
def kept(values):
    """Sum the squares of values.

    Args:
        values: numbers.
    """
    total = 0
    for value in values:
        total += value * value
    return total


def test_sums(values):
    """Check that kept sums the squares."""
    assert kept([1, 2]) == 5
    return True


class Box:
    def __init__(self, size):
        """Make a box of this size."""
        self.size = size
        self.items = []

    def abstract(self):
        """Subclasses say what this does."""
        raise NotImplementedError(
            "abstract"
        )

    def short(self):
        """A one line body here."""
        return 1

    def terse(self):
        """Two."""
        x = 1
        return x

    def inline(self): """Docstring on the def line."""; x = 1; return x  # noqa
'''

MODULE_B = '''
def kept(values):
    """Add up the squared values (a copy under another docstring)."""
    total = 0  # the same code, other comments and layout
    for value in values:
        total += value*value
    return total


def other(values):
    """sum  the squares of VALUES."""
    count = len(values)
    return count
'''


def test_pairs_follow_codesearchnets_filters_and_copies_are_dropped_across_splits(tmp_path):
    for name, source in {"alpha": MODULE_A, "beta": MODULE_B}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(source)
    dropped = Counter()
    tagged = [
        (split, pair)
        for split, module in (("train", "alpha"), ("eval", "beta"))
        for pair in package_pairs(tmp_path, Package(module, module), dropped, progress=False)
    ]
    kept = [(split, pair.id) for split, pair in deduplicated(iter(tagged), dropped)]
    assert kept == [("train", "alpha/__init__.py:kept")]
    assert dropped == {
        "test": 1,
        "dunder method": 1,
        "trivial body": 1,
        "short function": 1,
        "short query": 1,
        "docstring shares a line": 1,
        "duplicate body": 1,  # beta's kept: the same code
        "duplicate query": 1,  # beta's other: alpha's query in other case and spacing
    }
    (first,) = [pair for _, pair in tagged if pair.id == "alpha/__init__.py:kept"]
    assert first.query == "Sum the squares of values."
    assert first.document.startswith("def kept(values):\n    total = 0\n")


def test_the_default_packages_are_installed_and_split_apart():
    train, evaluated = ({package.module for package in group} for group in DEFAULT_PACKAGES.values())
    assert not train & evaluated
    for package in (*DEFAULT_PACKAGES["train"], *DEFAULT_PACKAGES["eval"]):
        assert (site_packages_holding(package) / package.module).is_dir()
        metadata.version(package.distribution)


# --- STS-B ------------------------------------------------------------------------------------------


def write_glue(folder: Path, splits: dict[str, list[tuple[str, str, float]]]) -> Path:
    """(sentence1, sentence2, score) rows in GLUE's STS-B layout."""
    (folder / "STS-B").mkdir(parents=True)
    for file, rows in splits.items():
        lines = ["\t".join(STSB_COLUMNS)]
        for index, (first, second, score) in enumerate(rows):
            fields = [str(index), "captions", "x", "2026", str(index), "a", "b", first, second, str(score)]
            lines.append("\t".join(fields))
        (folder / "STS-B" / file).write_text("\n".join(lines) + "\n")
    return folder


TINY_STSB = [
    ('A man plays a "guitar".', "A man is playing a guitar.", 4.8),
    ('A man plays a "guitar".', "Someone plays the guitar.", 4.2),  # the same query, a second paraphrase
    ("A dog runs.", "A cat sleeps.", 0.4),  # not a paraphrase, but its second sentence is in the corpus
    ("A woman slices onions.", "Someone plays the guitar.", 1.0),  # a document seen before
    ("Kids swim in a lake.", "Children are swimming in a lake.", 4.0),
]


def test_stsb_turns_paraphrases_into_queries_over_every_second_sentence(tmp_path):
    glue = write_glue(tmp_path / "glue", {"train.tsv": TINY_STSB, "dev.tsv": TINY_STSB[2:]})
    manifest = build_stsb(tmp_path / "task", glue)
    train = read_split(tmp_path / "task", "train")
    assert train.queries == {"q00000": 'A man plays a "guitar".', "q00001": "Kids swim in a lake."}
    assert train.corpus == {
        "d00000": "A man is playing a guitar.",
        "d00001": "Someone plays the guitar.",
        "d00002": "A cat sleeps.",
        "d00003": "Children are swimming in a lake.",
    }
    assert train.qrels == {"q00000": {"d00000": 1, "d00001": 1}, "q00001": {"d00003": 1}}
    assert manifest["splits"] == {
        "train": {"queries": 2, "documents": 4, "qrels": 3},
        "eval": {"queries": 1, "documents": 3, "qrels": 1},
    }
    build_stsb(tmp_path / "again", glue)
    assert file_bytes(tmp_path / "again") == file_bytes(tmp_path / "task")


@needs_stsb
def test_stsb_on_the_real_glue_data_keeps_every_paraphrase_and_only_them(tmp_path):
    build_stsb(tmp_path / "task", STSB.parent)
    for split, file in (("train", "train.tsv"), ("eval", "dev.tsv")):
        task = read_split(tmp_path / "task", split)
        rows = list(stsb_rows(STSB / file))
        paraphrases = {(first, second) for first, second, score in rows if score >= 4}
        judged = {(task.queries[q], task.corpus[d]) for q, relevant in task.qrels.items() for d in relevant}
        assert judged == paraphrases
        assert sorted(task.corpus.values()) == sorted({second for _, second, _ in rows})
        assert len(set(task.queries.values())) == len(task.queries)


# --- metrics ----------------------------------------------------------------------------------------


def brute_force_metrics(scores: list[list[float]], relevant: list[dict[int, int]]) -> dict[str, float]:
    """The metrics one query at a time, from each query's full ranking (equal scores in corpus order)."""
    totals = Counter()
    for row, grades in zip(scores, relevant):
        order = sorted(range(len(row)), key=lambda document: -row[document])
        dcg = sum(grades.get(document, 0) / math.log2(i + 2) for i, document in enumerate(order[:10]))
        ideal = sum(grade / math.log2(i + 2) for i, grade in enumerate(sorted(grades.values(), reverse=True)[:10]))
        totals["ndcg_at_10"] += dcg / ideal
        hits = [i for i, document in enumerate(order[:10]) if grades.get(document, 0) > 0]
        totals["mrr_at_10"] += 1 / (hits[0] + 1) if hits else 0.0
        for k in CUTOFFS["recall"]:
            totals[f"recall_at_{k}"] += sum(document in grades for document in order[:k]) / len(grades)
    return {name: total / len(scores) for name, total in totals.items()}


def rankings_of(scores: torch.Tensor) -> torch.Tensor:
    return scores.sort(dim=1, descending=True, stable=True).indices[:, :100]


def test_metrics_match_hand_computed_values():
    # Query 0 ranks d2, d0, d1 with d0 and d1 relevant; query 1 ranks b=d1 (grade 1) above a=d0 (grade 2).
    rankings = torch.tensor([[2, 0, 1], [1, 0, 2]])
    metrics = ranking_metrics(rankings, [{0: 1, 1: 1}, {0: 2, 1: 1}])
    ndcg0 = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))  # 0.6934
    ndcg1 = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))  # 0.8597
    assert metrics["ndcg_at_10"] == pytest.approx((ndcg0 + ndcg1) / 2)
    assert metrics["mrr_at_10"] == pytest.approx((1 / 2 + 1) / 2)
    assert metrics["recall_at_1"] == pytest.approx((0 + 1 / 2) / 2)
    assert metrics["recall_at_10"] == metrics["recall_at_100"] == 1.0


def test_metrics_match_a_brute_force_reference_on_random_rankings():
    generator = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    documents = 150  # more than the deepest cutoff, so some relevant documents rank past it
    scores = torch.rand(40, documents, generator=generator).double()
    scores[:, :20] = scores[:, :20].round(decimals=1)  # some ties, which corpus order breaks
    judged = [rng.sample(range(documents), rng.randint(1, 8)) for _ in range(40)]
    relevant = [{document: rng.choice([1, 1, 2, 3]) for document in documents} for documents in judged]
    expected = brute_force_metrics(scores.tolist(), relevant)
    assert ranking_metrics(rankings_of(scores), relevant) == pytest.approx(expected, abs=1e-12)


def test_the_fine_tuning_metric_agrees_with_eval_retrievals_metrics():
    """Retrieval (fine-tuning's in-training metric) ranks each query's own positive among all positives."""
    queries, positives = torch.randn(64, 16), torch.randn(64, 16)
    rankings = rankings_of(queries @ positives.T)
    expected = ranking_metrics(rankings, [{i: 1} for i in range(64)])
    for kind, k in (("recall", 1), ("recall", 10), ("ndcg", 10)):
        metric = Retrieval(kind, k)
        metric.update(queries, positives)
        assert metric.compute().item() == pytest.approx(expected[f"{kind}_at_{k}"], abs=1e-6)


# --- scorers ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class FixedScorer:
    """A dense scorer with known vectors: each text's vector is given."""

    vectors: dict[str, torch.Tensor]

    def encode(self, texts, role):
        return torch.stack([self.vectors[text] for text in texts])

    def scores(self, queries, documents):
        return queries @ documents.T


@dataclasses.dataclass
class BagOfWordsMaxSim:
    """A toy late-interaction scorer: one one-hot vector per word, scored by MaxSim (the sum over a
    query's words of their best match in the document), as ColBERT scores token vectors."""

    vocabulary: list[str]

    def encode(self, texts, role):
        index = {word: i for i, word in enumerate(self.vocabulary)}
        return [torch.eye(len(self.vocabulary))[[index[word] for word in text.split()]] for text in texts]

    def scores(self, queries, documents):
        return torch.tensor([[(q @ d.T).max(dim=1).values.sum().item() for d in documents] for q in queries])


def small_split(queries: list[str], documents: list[str], relevant: list[list[int]]) -> RetrievalSplit:
    return RetrievalSplit(
        {f"q{i}": text for i, text in enumerate(queries)},
        {f"d{i}": text for i, text in enumerate(documents)},
        {f"q{i}": {f"d{d}": 1 for d in ds} for i, ds in enumerate(relevant)},
    )


def test_evaluate_scores_known_embeddings_as_the_brute_force_reference():
    generator = torch.Generator().manual_seed(1)
    queries, documents = [f"query {i}" for i in range(30)], [f"doc {i}" for i in range(120)]
    split = small_split(queries, documents, [[i, i + 30] for i in range(30)])
    texts = [*split.queries.values(), *split.corpus.values()]
    vectors = torch.nn.functional.normalize(torch.randn(len(texts), 8, generator=generator), dim=1)
    scorer = FixedScorer(dict(zip(texts, vectors)))
    result = evaluate(scorer, split)
    scores = (vectors[:30] @ vectors[30:].T).tolist()
    assert result.metrics == pytest.approx(brute_force_metrics(scores, [{i: 1, i + 30: 1} for i in range(30)]))
    assert (result.queries, result.documents) == (30, 120)


def test_a_late_interaction_scorer_plugs_into_the_same_evaluation():
    documents = ["red apple pie", "blue sky", "green tea cup", "red sky night"]
    split = small_split(["apple pie", "tea cup", "sky night"], documents, [[0], [2], [3]])
    result = evaluate(BagOfWordsMaxSim(sorted({w for t in documents for w in t.split()})), split)
    assert result.metrics["recall_at_1"] == result.metrics["ndcg_at_10"] == 1.0


# --- flexbert eval-retrieval on a tiny random model -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised encoder with ModernBERT's tokenizer, as import-hf writes one."""
    tokenizer = load_tokenizer(TOKENIZER)
    config = tiny_config(
        vocab_size=50368, pad_token_id=tokenizer.pad_id, cls_token_id=tokenizer.cls_id, sep_token_id=tokenizer.sep_id
    )
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    write_weights(path, FlexBertForMaskedLM(config).state_dict(), **{MODEL_CONFIG_KEY: dataclasses.asdict(config)})
    return path


def synthetic_pairs(count: int, seed: int) -> list[tuple[str, str, float]]:
    rng = random.Random(seed)
    words = "the a cat dog sat ran on under mat park fast slow red blue green old young tall".split()
    rows = []
    for _ in range(count):
        first = rng.choices(words, k=rng.randint(4, 9))
        second = [word if rng.random() < 0.6 else rng.choice(words) for word in first]
        rows.append((" ".join(first), " ".join(second), round(5 * rng.random(), 2)))
    return rows


def independent_embeddings(checkpoint: Path, texts: list[str]) -> np.ndarray:
    """Each text embedded alone, [CLS] text [SEP], with the model as the checkpoint loads."""
    embedder, tokenizer = load_embedder(checkpoint, "mean"), load_tokenizer(TOKENIZER)
    vectors = []
    with torch.no_grad():
        for ids in tokenizer.encode_batch(texts):
            framed = torch.tensor([tokenizer.cls_id, *ids, tokenizer.sep_id])
            cu_seqlens = torch.tensor([0, len(framed)], dtype=torch.int32)
            vectors.append(embedder.model.embed(framed, cu_seqlens=cu_seqlens, max_seqlen=len(framed))[0].numpy())
    return np.stack(vectors)


def run(*args: str) -> int:
    return main(["eval-retrieval", *map(str, args)])


def test_eval_retrieval_on_a_tiny_model_reports_the_metrics_of_its_embeddings(tiny_checkpoint, tmp_path, capsys):
    glue = write_glue(tmp_path / "glue", {"train.tsv": synthetic_pairs(20, 0), "dev.tsv": synthetic_pairs(60, 1)})
    assert main(["prepare", "retrieval", "--task", "stsb", "--glue", str(glue), "--output", str(tmp_path / "t")]) == 0
    out = tmp_path / "results.json"
    common = ("--pooling", "mean", "--tokenizer", TOKENIZER, "--no-progress")
    assert run(tiny_checkpoint, "--task", tmp_path / "t", *common, "--max-tokens-per-batch", 64, "--out", out) == 0
    report = json.loads(out.read_text())
    assert report["scoring"] == "mean pooling" and report["split"] == "eval"
    assert all(0.0 <= value <= 1.0 for value in report["metrics"].values())
    assert "ndcg_at_10" in capsys.readouterr().out

    split = read_split(tmp_path / "t", "eval")
    query_ids, document_ids = list(split.qrels), list(split.corpus)
    vectors = independent_embeddings(tiny_checkpoint, [*(split.queries[q] for q in query_ids), *split.corpus.values()])
    scores = vectors[: len(query_ids)] @ vectors[len(query_ids) :].T
    relevant = [{document_ids.index(d): grade for d, grade in split.qrels[q].items()} for q in query_ids]
    assert report["metrics"] == pytest.approx(brute_force_metrics(scores.tolist(), relevant), abs=1e-9)
    assert (report["queries"], report["documents"]) == (len(query_ids), len(document_ids))


def test_a_query_equal_to_its_document_is_found_first(tiny_checkpoint, tmp_path):
    texts = [" ".join(words) for words in (row[:2] for row in synthetic_pairs(40, 2))]
    texts = list(dict.fromkeys(texts))  # distinct documents
    write_split(tmp_path / "task" / "eval", small_split(texts, texts, [[i] for i in range(len(texts))]))
    out = tmp_path / "results.json"
    common = ("--pooling", "cls", "--tokenizer", TOKENIZER, "--no-progress")
    assert run(tiny_checkpoint, "--task", tmp_path / "task", *common, "--out", out) == 0
    assert json.loads(out.read_text())["metrics"]["recall_at_1"] == 1.0


# --- bad inputs -------------------------------------------------------------------------------------


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flexbert: error: "), err
    return err


def test_a_missing_task_or_split_is_one_line(tmp_path, capsys):
    assert run("no-model", "--task", tmp_path / "absent") == 2
    assert "absent does not exist" in one_error_line(capsys)
    write_split(tmp_path / "task" / "train", small_split(["a b"], ["a b"], [[0]]))
    assert run("no-model", "--task", tmp_path / "task", "--split", "eval") == 2
    assert "has no split 'eval' (splits: train)" in one_error_line(capsys)


@pytest.mark.parametrize(
    "qrels, message",
    [
        ("query-id\tcorpus-id\tscore\nq0\td0\tyes\n", "qrels.tsv:2: expected 'query-id<TAB>corpus-id<TAB>integer"),
        ("q0 d0 1\n", "qrels.tsv:1: expected"),
        ("q0\td7\t1\n", "qrels.tsv:1: document 'd7' is not in corpus.jsonl"),
        ("q9\td0\t1\n", "qrels.tsv:1: query 'q9' is not in queries.jsonl"),
        ("q0\td0\t0\n", "names no relevant document"),
    ],
)
def test_malformed_qrels_are_one_line_naming_the_file(tmp_path, capsys, qrels, message):
    write_split(tmp_path / "task" / "eval", small_split(["a b"], ["a b"], [[0]]))
    (tmp_path / "task" / "eval" / "qrels.tsv").write_text(qrels)
    assert run("no-model", "--task", tmp_path / "task") == 2
    assert message in one_error_line(capsys)


def test_malformed_queries_and_a_missing_model_are_one_line(tmp_path, capsys):
    write_split(tmp_path / "task" / "eval", small_split(["a b"], ["a b"], [[0]]))
    assert run(tmp_path / "no-model.pt", "--task", tmp_path / "task", "--pooling", "mean") == 2
    assert "no-model.pt does not exist" in one_error_line(capsys)
    (tmp_path / "task" / "eval" / "queries.jsonl").write_text('{"_id": "q0", "text": "a b"}\n{"_id": "q0"\n')
    assert run("no-model", "--task", tmp_path / "task") == 2
    assert "queries.jsonl:2: not JSON" in one_error_line(capsys)


def test_a_model_without_a_known_tokenizer_is_one_line(tiny_checkpoint, tmp_path, capsys):
    write_split(tmp_path / "task" / "eval", small_split(["a b"], ["a b"], [[0]]))
    assert run(tiny_checkpoint, "--task", tmp_path / "task", "--pooling", "mean") == 2
    assert "no tokenizer is known for the model; add --tokenizer DIR" in one_error_line(capsys)


def test_prepare_retrieval_refuses_a_missing_glue_folder_and_an_occupied_output(tmp_path, capsys):
    prepare = ["prepare", "retrieval", "--task", "stsb", "--output", str(tmp_path / "task")]
    assert main([*prepare, "--glue", str(tmp_path / "nowhere")]) == 2
    assert "STS-B/train.tsv does not exist" in one_error_line(capsys)
    assert not (tmp_path / "task").exists()
    glue = write_glue(tmp_path / "glue", {"train.tsv": TINY_STSB, "dev.tsv": TINY_STSB})
    assert main([*prepare, "--glue", str(glue)]) == 0
    capsys.readouterr()
    assert main([*prepare, "--glue", str(glue)]) == 2
    assert "already exists" in one_error_line(capsys)
    with pytest.raises(OutputExistsError):
        build_stsb(tmp_path / "task", glue)


def test_a_bad_stsb_score_names_its_line(tmp_path):
    glue = write_glue(tmp_path / "glue", {"train.tsv": [("a", "b", "high")], "dev.tsv": TINY_STSB})
    with pytest.raises(RetrievalTaskError, match=r"train.tsv:2: score 'high' is not a number"):
        build_stsb(tmp_path / "task", glue)
