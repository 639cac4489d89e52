"""Labelled text for fine-tuning: sentences or sentence pairs with a class or a score, read from
CSV/TSV/JSONL files or a ``save_to_disk`` dataset, tokenized and batched unpadded."""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flexbert.core.model.losses import IGNORE_INDEX
from flexbert.core.tokenizer import MLMTokenizer
from flexbert.errors import FlexBertError


class LabeledDataError(FlexBertError, ValueError):
    """A fine-tuning split cannot be used as configured."""


@dataclass
class SplitConfig:
    path: str  # .tsv, .csv, .jsonl, or a save_to_disk directory
    text_columns: list[str] = field(default_factory=lambda: ["sentence"])  # one column, or two for pairs
    label_column: str = "label"
    header: list[str] | None = None  # column names of a CSV/TSV without a header row (GLUE's CoLA)
    min_score: float | None = None  # pair tasks: keep rows whose label_column score is at least this
    limit: int | None = None  # first N examples only (quick runs, tests)


def _rows(path: Path, header: list[str] | None) -> Iterator[dict]:
    if path.is_dir():
        import datasets

        yield from datasets.load_from_disk(str(path))
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise LabeledDataError(f"{path}:{number}: not JSON ({err.msg})") from None
    elif path.suffix in (".tsv", ".csv"):
        with path.open(encoding="utf-8", newline="") as file:
            # GLUE's TSVs quote nothing; a quote character inside a sentence is just a character.
            dialect = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if path.suffix == ".tsv" else {}
            yield from csv.DictReader(file, fieldnames=header, **dialect)
    else:
        raise LabeledDataError(f"{path}: unsupported format (use .tsv, .csv, .jsonl or a save_to_disk folder)")


@dataclass
class LabeledSplit:
    """Tokenized examples: each is [CLS] A [SEP] (B [SEP]) with one label, or, for token tasks,
    [CLS] words [SEP] with a label at the first sub-token of every word (-100 elsewhere)."""

    token_ids: list[np.ndarray]
    labels: torch.Tensor | list[np.ndarray]  # [N] class ids or float scores; per-token arrays for token tasks
    truncated: int


def load_split(
    config: SplitConfig,
    tokenizer: MLMTokenizer,
    num_labels: int,
    max_seq_len: int,
    label_names: Sequence[str] | None = None,
    path: str = "split",
) -> LabeledSplit:
    """Read, check and tokenize one split. Class labels may be ids or, with ``label_names``, names."""
    file = Path(config.path)
    if not file.exists():
        raise LabeledDataError(f"{path}.path: {file} does not exist")
    if len(config.text_columns) not in (1, 2):
        raise LabeledDataError(f"{path}.text_columns: give one column, or two for sentence pairs")
    texts, labels = [], []
    for row in _rows(file, config.header):
        if config.limit is not None and len(labels) == config.limit:
            break
        for column in (*config.text_columns, config.label_column):
            if column not in row:
                raise LabeledDataError(f"{path}: {file} has no column {column!r} (columns: {', '.join(row)})")
        texts.append([str(row[column]) for column in config.text_columns])
        labels.append(_label(row[config.label_column], num_labels, label_names, f"{path}: {file} row {len(labels)}"))
    if not labels:
        raise LabeledDataError(f"{path}: {file} holds no examples")
    encodings = tokenizer.tokenizer.encode_batch(
        [tuple(pair) if len(pair) == 2 else pair[0] for pair in texts], add_special_tokens=True
    )
    token_ids = [fit(np.asarray(encoding.ids, dtype=np.int64), max_seq_len) for encoding in encodings]
    truncated = sum(len(encoding.ids) > max_seq_len for encoding in encodings)
    _warn_truncated(truncated, len(labels), file, max_seq_len, path)
    dtype = torch.float32 if num_labels == 1 else torch.int64
    return LabeledSplit(token_ids, torch.tensor(labels, dtype=dtype), truncated)


def fit(ids: np.ndarray, max_seq_len: int) -> np.ndarray:
    """At most ``max_seq_len`` tokens, keeping the closing [SEP]."""
    return ids if len(ids) <= max_seq_len else np.concatenate((ids[: max_seq_len - 1], ids[-1:]))


def _warn_truncated(truncated: int, total: int, file: Path, max_seq_len: int, path: str) -> None:
    if truncated:
        warnings.warn(
            f"{path}: {truncated} of {total} texts in {file} were longer than {max_seq_len} tokens and were truncated"
        )


def _label(value, num_labels: int, label_names: Sequence[str] | None, where: str) -> float | int:
    if num_labels == 1:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise LabeledDataError(f"{where}: label {value!r} is not a number (regression task)") from None
    if label_names is not None and str(value) in label_names:
        return list(label_names).index(str(value))
    try:
        label = int(value)
    except (TypeError, ValueError):
        raise LabeledDataError(
            f"{where}: label {value!r} is not a class id" + (f" or one of {list(label_names)}" if label_names else "")
        ) from None
    if not 0 <= label < num_labels:
        raise LabeledDataError(f"{where}: label {label} is outside [0, num_labels={num_labels})")
    return label


def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """Sentences of a CoNLL file: one word per line with its tag in the last column, a blank line
    between sentences, ``-DOCSTART-`` lines ignored."""
    sentences, words, tags = [], [], []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if words:
                    sentences.append((words, tags))
                words, tags = [], []
                continue
            if len(fields) < 2:
                raise LabeledDataError(f"{path}:{number}: expected a word and a tag, got {line.strip()!r}")
            words.append(fields[0])
            tags.append(fields[-1])
    if words:
        sentences.append((words, tags))
    return sentences


def load_conll_split(
    file: str | Path,
    tokenizer: MLMTokenizer,
    label_names: Sequence[str],
    max_seq_len: int,
    path: str = "split",
    limit: int | None = None,
) -> LabeledSplit:
    """Tokenize a CoNLL split for token classification, labelling each word's first sub-token."""
    file = Path(file)
    if not file.is_file():
        raise LabeledDataError(f"{path}.path: {file} does not exist")
    sentences = read_conll(file)[:limit]
    if not sentences:
        raise LabeledDataError(f"{path}: {file} holds no sentences")
    index = {name: i for i, name in enumerate(label_names)}
    # A space before every word but the first, as in running text, so words tokenize as they would there.
    encodings = tokenizer.tokenizer.encode_batch(
        [[word if i == 0 else " " + word for i, word in enumerate(words)] for words, _ in sentences],
        is_pretokenized=True,
        add_special_tokens=True,
    )
    token_ids, labels, truncated = [], [], 0
    for (_words, tags), encoding in zip(sentences, encodings):
        unknown = sorted(set(tags) - index.keys())
        if unknown:
            raise LabeledDataError(f"{path}: {file} uses tags {unknown} missing from task.label_names")
        word_ids = encoding.word_ids
        token_labels = np.full(len(word_ids), IGNORE_INDEX, dtype=np.int64)
        for position, word in enumerate(word_ids):
            if word is not None and (position == 0 or word_ids[position - 1] != word):
                token_labels[position] = index[tags[word]]
        if len(token_labels) > max_seq_len:
            truncated += 1
            token_labels[max_seq_len - 1] = IGNORE_INDEX  # that position becomes the closing [SEP]
        token_ids.append(fit(np.asarray(encoding.ids, dtype=np.int64), max_seq_len))
        labels.append(token_labels[:max_seq_len])
    _warn_truncated(truncated, len(sentences), file, max_seq_len, path)
    return LabeledSplit(token_ids, labels, truncated)


def unpadded(pieces: Sequence[np.ndarray]) -> dict:
    """Token sequences as one flat stream with cu_seqlens, the encoder's input form."""
    lengths = torch.tensor([len(p) for p in pieces], dtype=torch.int32)
    return {
        "input_ids": torch.from_numpy(np.concatenate(pieces)),
        "cu_seqlens": torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0)),
        "max_seqlen": int(lengths.max()),
    }


def _order(count: int, shuffle: bool, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(count) if shuffle else np.arange(count)


def global_batches(count: int, batch_size: int, world: int) -> list[tuple[int, int]]:
    """[start, end) of each global batch of ``batch_size`` examples out of ``count``, where a last
    batch too small to give each of the ``world`` ranks an example joins the one before it."""
    starts = list(range(0, count, batch_size))
    if len(starts) > 1 and count - starts[-1] < world:
        starts.pop()
    return list(zip(starts, [*starts[1:], count]))


def rank_shares(
    count: int, batch_size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1
) -> Iterator[np.ndarray]:
    """The example indices of this rank's share of each global batch: the batch split into ``world``
    contiguous parts whose sizes differ by at most one. Every rank gets as many batches as the others,
    none empty (given ``count >= world``), and together the ranks see each example exactly once."""
    order = _order(count, shuffle, seed)
    for start, end in global_batches(count, batch_size, world):
        yield np.array_split(order[start:end], world)[rank]


def batches(
    split: LabeledSplit, batch_size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1
) -> Iterator[dict]:
    """Unpadded batches: the flat token stream, cu_seqlens, and the labels of each example; under
    several processes, this rank's share of each global batch of ``batch_size`` (see :func:`rank_shares`)."""
    for chosen in rank_shares(len(split.token_ids), batch_size, shuffle, seed, rank, world):
        yield {
            **unpadded([split.token_ids[i] for i in chosen]),
            "labels": (
                split.labels[torch.from_numpy(chosen)]
                if isinstance(split.labels, torch.Tensor)
                else torch.from_numpy(np.concatenate([split.labels[i] for i in chosen]))
            ),
            "example_ids": chosen,  # host indices into the split, for the NaN guard's message
        }


@dataclass
class PairSplit:
    """(query, positive) text pairs for contrastive training, each with a hard negative where the
    data gives one; each text is [CLS] text [SEP]."""

    queries: list[np.ndarray]
    positives: list[np.ndarray]
    negatives: list[np.ndarray] | None = None

    @property
    def token_ids(self) -> list[np.ndarray]:  # one entry per example, for counting
        return self.queries


def load_pair_split(config: SplitConfig, tokenizer: MLMTokenizer, max_seq_len: int, path: str = "split") -> PairSplit:
    """Pairs from ``text_columns`` [query, positive] or [query, positive, hard negative]; rows whose
    ``label_column`` holds a score below ``min_score`` (when set) are skipped, so graded data such as
    STS-B yields only close pairs."""
    file = Path(config.path)
    if not file.exists():
        raise LabeledDataError(f"{path}.path: {file} does not exist")
    if len(config.text_columns) not in (2, 3):
        raise LabeledDataError(
            f"{path}.text_columns: give two columns, the query and its positive, or three, adding a hard negative"
        )
    pairs = []
    for row in _rows(file, config.header):
        if config.limit is not None and len(pairs) == config.limit:
            break
        missing = [column for column in config.text_columns if column not in row]
        if missing:
            raise LabeledDataError(f"{path}: {file} has no column {missing[0]!r} (columns: {', '.join(row)})")
        if config.min_score is not None and float(row[config.label_column]) < config.min_score:
            continue
        pairs.append([str(row[column]) for column in config.text_columns])
    if not pairs:
        raise LabeledDataError(f"{path}: {file} holds no pairs")
    columns = len(config.text_columns)
    encodings = [tokenizer.tokenizer.encode_batch([pair[side] for pair in pairs]) for side in range(columns)]
    texts = [[fit(np.asarray(e.ids, dtype=np.int64), max_seq_len) for e in side] for side in encodings]
    truncated = sum(len(e.ids) > max_seq_len for side in encodings for e in side)
    _warn_truncated(truncated, columns * len(pairs), file, max_seq_len, path)
    return PairSplit(*texts)


def pair_batches(
    split: PairSplit, batch_size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1
) -> Iterator[dict]:
    """Unpadded batches of the B queries, then their B positives in the same order, then (where the
    split has them) their B hard negatives; ``num_queries`` is B. Under several processes each rank
    takes its share of the pairs, and its in-batch negatives are the other documents of its share."""
    sides = [split.queries, split.positives, *([split.negatives] if split.negatives is not None else [])]
    for chosen in rank_shares(len(split.queries), batch_size, shuffle, seed, rank, world):
        texts = unpadded([side[i] for side in sides for i in chosen])
        yield {**texts, "num_queries": len(chosen), "example_ids": chosen}


@dataclass
class DistillationSplit:
    """Queries, each with the same number of candidate documents and a teacher's score for each,
    whose distribution over its candidates a student learns (as PyLate distils ColBERT models)."""

    queries: list[np.ndarray]
    documents: list[list[np.ndarray]]  # each query's candidates, in the teacher's order
    teacher_scores: torch.Tensor  # [queries, candidates]

    @property
    def token_ids(self) -> list[np.ndarray]:  # one entry per example, for counting
        return self.queries


def load_distillation_split(
    config: SplitConfig, tokenizer: MLMTokenizer, max_seq_len: int, path: str = "split"
) -> DistillationSplit:
    """Rows of ``text_columns`` [query, documents] (a text, and a list of texts) with the teacher's
    scores, one per document, in ``label_column``; every row has as many documents as the first."""
    file = Path(config.path)
    if not file.exists():
        raise LabeledDataError(f"{path}.path: {file} does not exist")
    if len(config.text_columns) != 2:
        raise LabeledDataError(f"{path}.text_columns: give two columns, the query and its list of documents")
    query_column, documents_column = config.text_columns
    queries, documents, scores = [], [], []
    for number, row in enumerate(_rows(file, config.header), 1):
        if config.limit is not None and len(queries) == config.limit:
            break
        candidates, teacher = row.get(documents_column), row.get(config.label_column)
        where = f"{path}: {file} row {number}"
        if not isinstance(row.get(query_column), str):
            raise LabeledDataError(f"{where}: {query_column!r} must be a text")
        if not (isinstance(candidates, list) and candidates and all(isinstance(text, str) for text in candidates)):
            raise LabeledDataError(f"{where}: {documents_column!r} must be a non-empty list of texts")
        if not (isinstance(teacher, list) and all(isinstance(x, (int, float)) for x in teacher)):
            raise LabeledDataError(f"{where}: {config.label_column!r} must be a list of scores")
        if len(teacher) != len(candidates) or (documents and len(candidates) != len(documents[0])):
            raise LabeledDataError(
                f"{where}: {len(candidates)} documents and {len(teacher)} scores; every row needs "
                f"{len(documents[0]) if documents else len(candidates)} of each"
            )
        queries.append(row[query_column])
        documents.append(candidates)
        scores.append(teacher)
    if not queries:
        raise LabeledDataError(f"{path}: {file} holds no rows")

    def tokenized(texts: list[str]) -> list[np.ndarray]:
        return [fit(np.asarray(e.ids, dtype=np.int64), max_seq_len) for e in tokenizer.tokenizer.encode_batch(texts)]

    flat = tokenized([text for candidates in documents for text in candidates])
    per_query = len(documents[0])
    grouped = [flat[start : start + per_query] for start in range(0, len(flat), per_query)]
    return DistillationSplit(tokenized(queries), grouped, torch.tensor(scores, dtype=torch.float32))


def distillation_batches(
    split: DistillationSplit, batch_size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1
) -> Iterator[dict]:
    """Unpadded batches of the B queries, then each query's candidates in turn; ``num_queries`` is B
    and ``teacher_scores`` [B, candidates] the teacher's scores of them."""
    for chosen in rank_shares(len(split.queries), batch_size, shuffle, seed, rank, world):
        texts = [split.queries[i] for i in chosen] + [document for i in chosen for document in split.documents[i]]
        yield {
            **unpadded(texts),
            "num_queries": len(chosen),
            "teacher_scores": split.teacher_scores[torch.from_numpy(chosen)],
            "example_ids": chosen,
        }
