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

from flexbert.data.masking import IGNORE_INDEX
from flexbert.data.tokenizer import MLMTokenizer


class LabeledDataError(ValueError):
    """A fine-tuning split cannot be used as configured."""


@dataclass
class SplitConfig:
    path: str  # .tsv, .csv, .jsonl, or a save_to_disk directory
    text_columns: list[str] = field(default_factory=lambda: ["sentence"])  # one column, or two for pairs
    label_column: str = "label"
    header: list[str] | None = None  # column names of a CSV/TSV without a header row (GLUE's CoLA)
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


def load_split(config: SplitConfig, tokenizer: MLMTokenizer, num_labels: int, max_seq_len: int,
               label_names: Sequence[str] | None = None, path: str = "split") -> LabeledSplit:
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
        [tuple(pair) if len(pair) == 2 else pair[0] for pair in texts], add_special_tokens=True)
    token_ids, truncated = [], 0
    for encoding in encodings:
        ids = np.asarray(encoding.ids, dtype=np.int64)
        if len(ids) > max_seq_len:
            truncated += 1
            ids = np.concatenate((ids[: max_seq_len - 1], [tokenizer.sep_id]))  # keep the closing [SEP]
        token_ids.append(ids)
    if truncated:
        warnings.warn(f"{path}: {truncated} of {len(labels)} examples in {file} were longer than "
                      f"{max_seq_len} tokens and were truncated")
    dtype = torch.float32 if num_labels == 1 else torch.int64
    return LabeledSplit(token_ids, torch.tensor(labels, dtype=dtype), truncated)


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
        raise LabeledDataError(f"{where}: label {value!r} is not a class id"
                               + (f" or one of {list(label_names)}" if label_names else "")) from None
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


def load_conll_split(file: str | Path, tokenizer: MLMTokenizer, label_names: Sequence[str], max_seq_len: int,
                     path: str = "split", limit: int | None = None) -> LabeledSplit:
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
        is_pretokenized=True, add_special_tokens=True)
    token_ids, labels, truncated = [], [], 0
    for (words, tags), encoding in zip(sentences, encodings):
        unknown = sorted(set(tags) - index.keys())
        if unknown:
            raise LabeledDataError(f"{path}: {file} uses tags {unknown} missing from task.label_names")
        word_ids = encoding.word_ids
        token_labels = np.full(len(word_ids), IGNORE_INDEX, dtype=np.int64)
        for position, word in enumerate(word_ids):
            if word is not None and (position == 0 or word_ids[position - 1] != word):
                token_labels[position] = index[tags[word]]
        ids = np.asarray(encoding.ids, dtype=np.int64)
        if len(ids) > max_seq_len:
            truncated += 1
            ids = np.concatenate((ids[: max_seq_len - 1], [tokenizer.sep_id]))
            token_labels = np.concatenate((token_labels[: max_seq_len - 1], [IGNORE_INDEX]))
        token_ids.append(ids)
        labels.append(token_labels)
    if truncated:
        warnings.warn(f"{path}: {truncated} of {len(sentences)} sentences in {file} were longer than "
                      f"{max_seq_len} tokens and were truncated")
    return LabeledSplit(token_ids, labels, truncated)


def batches(split: LabeledSplit, batch_size: int, shuffle: bool, seed: int) -> Iterator[dict]:
    """Unpadded batches: the flat token stream, cu_seqlens, and the labels of each example."""
    order = np.random.default_rng(seed).permutation(len(split.token_ids)) if shuffle else np.arange(len(split.token_ids))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        pieces = [split.token_ids[i] for i in chosen]
        lengths = torch.tensor([len(p) for p in pieces], dtype=torch.int32)
        yield {
            "input_ids": torch.from_numpy(np.concatenate(pieces)),
            "cu_seqlens": torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0)),
            "max_seqlen": int(lengths.max()),
            "labels": (split.labels[torch.from_numpy(chosen)] if isinstance(split.labels, torch.Tensor)
                       else torch.from_numpy(np.concatenate([split.labels[i] for i in chosen]))),
        }
