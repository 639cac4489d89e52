"""A retrieval task's folder, in BEIR's layout, as ``flexbert prepare retrieval`` writes it and
``flexbert eval-retrieval`` reads it.

Per split, ``SPLIT/queries.jsonl`` and ``SPLIT/corpus.jsonl`` (records ``{"_id", "text"}``; a corpus
record may add a ``title``) and ``SPLIT/qrels.tsv`` (``query-id corpus-id score`` under a header line,
score > 0 meaning relevant), plus ``SPLIT/pairs.jsonl``: one ``{"query", "document"}`` record per
relevant pair, the texts themselves, which a contrastive fine-tune reads as its split.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from flexbert.errors import FlexBertError, MissingFileError

SPLITS = ("train", "eval")
QUERIES, CORPUS, QRELS, MANIFEST = "queries.jsonl", "corpus.jsonl", "qrels.tsv", "manifest.json"
PAIRS = "pairs.jsonl"  # for training: the texts of each relevant pair
QRELS_HEADER = ("query-id", "corpus-id", "score")


class RetrievalTaskError(FlexBertError, ValueError):
    """A retrieval task cannot be built or read as asked."""


@dataclass
class RetrievalSplit:
    """Queries and documents by id, and each query's relevant documents with their grades (> 0)."""

    queries: dict[str, str] = field(default_factory=dict)
    corpus: dict[str, str] = field(default_factory=dict)
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {
            "queries": len(self.queries),
            "documents": len(self.corpus),
            "qrels": sum(len(relevant) for relevant in self.qrels.values()),
        }


# --- the layout on disk -----------------------------------------------------------------------------


def _write_jsonl(path: Path, texts: dict[str, str]) -> None:
    with path.open("wb") as out:
        for text_id, text in texts.items():
            line = json.dumps({"_id": text_id, "text": text}, ensure_ascii=False) + "\n"
            out.write(line.encode("utf-8", errors="replace"))  # a docstring can spell a lone surrogate


def write_split(directory: Path, split: RetrievalSplit) -> None:
    """``directory``/queries.jsonl, corpus.jsonl, qrels.tsv and pairs.jsonl, in the split's own order."""
    directory.mkdir(parents=True)
    _write_jsonl(directory / QUERIES, split.queries)
    _write_jsonl(directory / CORPUS, split.corpus)
    with (directory / QRELS).open("w", encoding="utf-8") as out:
        out.write("\t".join(QRELS_HEADER) + "\n")
        for query_id, relevant in split.qrels.items():
            for document_id, grade in relevant.items():
                out.write(f"{query_id}\t{document_id}\t{grade}\n")
    with (directory / PAIRS).open("wb") as out:
        for query_id, relevant in split.qrels.items():
            for document_id in relevant:
                pair = {"query": split.queries[query_id], "document": split.corpus[document_id]}
                out.write((json.dumps(pair, ensure_ascii=False) + "\n").encode("utf-8", errors="replace"))


def _read_jsonl(path: Path) -> dict[str, str]:
    """Texts by id; a corpus record's title, when it has one, leads its text (as BEIR's models read it)."""
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist")
    texts = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise RetrievalTaskError(f"{path}:{number}: not JSON ({err.msg})") from None
            if not (isinstance(record, dict) and isinstance(record.get("_id"), str)):
                raise RetrievalTaskError(f"{path}:{number}: expected an object with a string _id")
            if not isinstance(record.get("text"), str):
                raise RetrievalTaskError(f"{path}:{number}: record {record['_id']!r} has no string text")
            if record["_id"] in texts:
                raise RetrievalTaskError(f"{path}:{number}: id {record['_id']!r} appears twice")
            title = record.get("title")
            texts[record["_id"]] = f"{title} {record['text']}" if isinstance(title, str) and title else record["text"]
    return texts


def _read_qrels(path: Path, queries: dict[str, str], corpus: dict[str, str]) -> dict[str, dict[str, int]]:
    """Relevant documents by query; rows graded 0 (judged not relevant) are dropped."""
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            fields = line.rstrip("\n").split("\t")
            if number == 1 and tuple(fields) == QRELS_HEADER:
                continue
            if not line.strip():
                continue
            if len(fields) != 3 or not re.fullmatch(r"-?\d+", fields[2]):
                raise RetrievalTaskError(
                    f"{path}:{number}: expected 'query-id<TAB>corpus-id<TAB>integer score', got {line.strip()!r}"
                )
            query_id, document_id, grade = fields[0], fields[1], int(fields[2])
            if query_id not in queries:
                raise RetrievalTaskError(f"{path}:{number}: query {query_id!r} is not in {QUERIES}")
            if document_id not in corpus:
                raise RetrievalTaskError(f"{path}:{number}: document {document_id!r} is not in {CORPUS}")
            if grade > 0:
                qrels.setdefault(query_id, {})[document_id] = grade
    if not qrels:
        raise RetrievalTaskError(f"{path} names no relevant document (no row with a score above 0)")
    return qrels


def read_split(task_dir: str | os.PathLike, split: str) -> RetrievalSplit:
    """The split ``task_dir/split`` as written by :func:`write_split` (or any BEIR-style folder)."""
    directory = Path(task_dir) / split
    if not Path(task_dir).is_dir():
        raise MissingFileError(f"retrieval task {task_dir} does not exist (build one with flexbert prepare retrieval)")
    if not directory.is_dir():
        present = sorted(path.name for path in Path(task_dir).iterdir() if (path / QRELS).is_file())
        raise MissingFileError(f"{task_dir} has no split {split!r} (splits: {', '.join(present) or 'none'})")
    queries, corpus = _read_jsonl(directory / QUERIES), _read_jsonl(directory / CORPUS)
    return RetrievalSplit(queries, corpus, _read_qrels(directory / QRELS, queries, corpus))
