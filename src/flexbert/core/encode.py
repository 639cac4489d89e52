"""Embedding a corpus: ``flexbert encode MODEL INPUT OUT``.

The corpus is read in order and cut into shards of ``shard_size`` documents. Within a shard,
documents are sorted by length and cut into batches of at most ``max_tokens_per_batch`` tokens; each
batch is one unpadded stream (``cu_seqlens``), so no compute is spent on padding, and documents of
similar length share a batch, so the attention kernel's per-length grids stay small. The vectors go
back to corpus order before the shard is written:

    OUT/encode.json             what is encoded: model, input, settings (a rerun with others is refused)
    OUT/part-00000.npy          float32 [documents, hidden]: row i is the shard's i-th document
    OUT/part-00000.ids.npy      int64 [documents]: each row's position in the corpus
    OUT/part-00000.parquet      (--format parquet) columns id (int64) and embedding (float32 list)

A shard's files appear whole or not at all (written aside, then renamed), so an interrupted run
leaves finished shards and nothing half-written; running it again skips them. Inputs are the
corpora ``flexbert prepare mds`` reads (JSON lines, Parquet, text folders, saved datasets; see
:mod:`flexbert.core.sources`) or an MDS dataset it wrote. A document's position counts the corpus's
documents: blank lines hold none, and a record that gives none (bad JSON, no text) is refused,
since skipping it would shift every position after it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from flexbert.core.embedders import fitting_tokenizer
from flexbert.core.embedding import Embedder, Framing, embed_documents
from flexbert.core.sources import BadRecords, SourceError, find_inputs, iter_documents
from flexbert.errors import FlexBertError, MissingFileError

try:  # MDS shards are read with mosaicml-streaming's decoder, which the training extra installs
    from streaming.base.compression import decompress
    from streaming.base.format.mds.reader import MDSReader
except ImportError:
    MDSReader = decompress = None

Format = Literal["npy", "parquet"]
PLAN = "encode.json"
LAYOUT = "flexbert-encode-1"  # bump when the output layout changes
DEFAULT_SHARD_SIZE = 16_384  # documents: the unit of resumption, and of length sorting
DEFAULT_MAX_TOKENS_PER_BATCH = 32_768
MDS_COLUMN = "input_ids"  # what flexbert prepare mds writes: token ids without special tokens


class EncodeError(FlexBertError, ValueError):
    """A corpus or output cannot be encoded as asked."""


# --- the corpus -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """Documents in order: texts, or token ids without special tokens (an MDS dataset)."""

    path: Path
    tokenized: bool
    size: int | None  # documents, where known without reading them
    documents: Callable[[], Iterator[str | np.ndarray]]


def open_corpus(path: str | os.PathLike, text_field: str = "text") -> Corpus:
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"input not found: {path} does not exist")
    if (path / "index.json").is_file():
        if MDSReader is None:
            raise EncodeError(
                f"{path} is an MDS dataset; reading MDS needs mosaicml-streaming, which the training extra "
                "installs: pip install 'flexbert[train]'"
            )
        shards = _mds_shards(path)
        return Corpus(path, True, sum(shard["samples"] for shard in shards), lambda: _mds_documents(path, shards))
    find_inputs([path])  # a missing or unsupported input fails now, before the model is built
    return Corpus(path, False, None, lambda: _text_documents(path, text_field))


def _text_documents(path: Path, text_field: str) -> Iterator[str]:
    bad = BadRecords()
    for text in iter_documents([path], text_field, bad):
        if bad.counts:  # the record before this document gave none
            break
        yield text
    if bad.counts:
        raise SourceError(
            f"{path}: records that give no document would shift every position after them ({bad.describe()})"
        )


def _mds_shards(folder: Path) -> list[dict[str, Any]]:
    index = folder / "index.json"
    try:
        shards = json.loads(index.read_text())["shards"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EncodeError(f"{index} is not an MDS index ({type(err).__name__}: {err})") from None
    for shard in shards:
        if shard.get("format") != "mds" or MDS_COLUMN not in shard.get("column_names", []):
            raise EncodeError(f"{index}: a shard without an {MDS_COLUMN} column; is it a flexbert prepare mds output?")
    return shards


def _mds_documents(folder: Path, shards: list[dict[str, Any]]) -> Iterator[np.ndarray]:
    """Every sample's token ids, shard by shard, read without writing anything into ``folder``
    (streaming's own reader unpacks compressed shards next to them)."""
    for shard in shards:
        reader = MDSReader.from_json(str(folder), None, shard)
        zipped, raw = shard.get("zip_data"), shard["raw_data"]
        file = folder / (zipped or raw)["basename"]
        try:
            data = file.read_bytes()
            data = decompress(shard["compression"], data) if zipped else data
        except Exception as err:  # a missing file, or a damaged archive, fails in many ways
            raise EncodeError(f"shard {file} is missing or unreadable ({type(err).__name__}: {err})") from None
        # An MDS shard: the sample count, then the offsets of the samples' ends (uint32 each).
        count = int(np.frombuffer(data, np.uint32, 1)[0])
        offsets = np.frombuffer(data, np.uint32, count + 1, offset=4)
        for begin, end in itertools.pairwise(offsets.tolist()):
            yield reader.decode_sample(data[begin:end])[MDS_COLUMN]


# --- the output -------------------------------------------------------------------------------------


def shard_files(out: Path, index: int, fmt: Format) -> list[Path]:
    """A shard's files; the last one is written last, so its presence marks the shard finished."""
    stem = out / f"part-{index:05d}"
    if fmt == "parquet":
        return [stem.with_suffix(".parquet")]
    return [stem.with_suffix(".ids.npy"), stem.with_suffix(".npy")]


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    partial = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _save_npy(array: np.ndarray) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with open(path, "wb") as file:  # a file object: np.save would append .npy to a bare name
            np.save(file, array)

    return write


def _save_parquet(ids: np.ndarray, vectors: np.ndarray) -> Callable[[Path], None]:
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
    table = pa.table({"id": pa.array(ids), "embedding": embedding})
    return lambda path: pq.write_table(table, path)


def write_shard(out: Path, index: int, fmt: Format, ids: np.ndarray, vectors: np.ndarray) -> None:
    if fmt == "parquet":
        writers = [_save_parquet(ids, vectors)]
    else:
        writers = [_save_npy(ids), _save_npy(vectors)]
    for path, write in zip(shard_files(out, index, fmt), writers):
        _write_atomically(path, write)


def _fingerprint(path: Path) -> str:
    """A digest of the names, sizes and modification times of the files at ``path``: a resumed
    encoding must read the same model and corpus."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    listing = [[str(file.relative_to(path)) if path.is_dir() else file.name, *_stat(file)] for file in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def _stat(file: Path) -> tuple[int, int]:
    stat = file.stat()
    return stat.st_size, stat.st_mtime_ns


def _claim_output(out: Path, plan: dict[str, Any]) -> None:
    """Write the plan into a new OUT, or check that an existing OUT was encoding the same thing."""
    plan_file = out / PLAN
    if plan_file.is_file():
        previous = json.loads(plan_file.read_text())
        changed = sorted(key for key in plan.keys() | previous.keys() if plan.get(key) != previous.get(key))
        if changed:
            raise EncodeError(
                f"{out} holds an encoding with other {', '.join(changed)}; choose another OUT or remove it"
            )
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EncodeError(f"output {out} exists and holds no {PLAN}; choose another OUT or remove it")
    out.mkdir(parents=True, exist_ok=True)
    _write_atomically(plan_file, lambda path: path.write_text(json.dumps(plan, indent=2) + "\n"))


# --- the whole run ----------------------------------------------------------------------------------


@dataclass
class EncodeSummary:
    documents: int = 0
    shards_written: int = 0
    shards_skipped: int = 0  # finished by an earlier run
    tokens: int = 0  # embedded by this run, [CLS] and [SEP] included
    truncated: int = 0  # documents longer than max_seq_len, cut
    seconds: float = 0.0


def _tokenizer_for(embedder: Embedder, corpus: Corpus) -> Callable[[list], list]:
    """Documents -> their token ids without special tokens. A text corpus needs the tokenizer the
    model was trained with, or one with the same vocabulary and special tokens."""
    if corpus.tokenized:
        return lambda documents: documents
    if embedder.tokenizer_dir is None:
        raise EncodeError(
            f"no tokenizer is known for {embedder.path}, and {corpus.path} holds text; add --tokenizer DIR"
        )
    return fitting_tokenizer(embedder.config, embedder.tokenizer_dir).encode_batch


def encode_corpus(
    embedder: Embedder,
    corpus: Corpus,
    out: str | os.PathLike,
    fmt: Format = "npy",
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
    progress: bool = True,
) -> EncodeSummary:
    """Embed every document of ``corpus`` into shards under ``out`` (see the module's docstring),
    skipping shards an earlier run with the same model, corpus and settings finished."""
    if shard_size < 1 or max_tokens_per_batch < 1:
        raise EncodeError(f"shard size and token budget must be positive, got {shard_size} and {max_tokens_per_batch}")
    tokenize = _tokenizer_for(embedder, corpus)
    out = Path(out)
    plan = {
        "layout": LAYOUT,
        "model": str(embedder.path.absolute()),
        "model_files": _fingerprint(embedder.path),
        "input": str(corpus.path.absolute()),
        "input_files": _fingerprint(corpus.path),
        "pooling": embedder.pooling,
        "max_seq_len": embedder.max_seq_len,
        "tokenizer": str(embedder.tokenizer_dir.absolute()) if embedder.tokenizer_dir else None,
        "format": fmt,
        "shard_size": shard_size,
    }
    _claim_output(out, plan)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    embedder.model.to(device=device, dtype=torch.float32)
    framing = Framing(embedder.config.cls_token_id, embedder.config.sep_token_id, embedder.max_seq_len)
    summary, start = EncodeSummary(), time.perf_counter()
    documents = corpus.documents()
    with tqdm(total=corpus.size, unit="doc", desc=f"encode {corpus.path.name}", disable=not progress) as bar:
        for index in itertools.count():
            shard = list(itertools.islice(documents, shard_size))
            if not shard:
                break
            first = summary.documents
            summary.documents += len(shard)
            if shard_files(out, index, fmt)[-1].is_file():
                summary.shards_skipped += 1
            else:
                tokens = tokenize(shard)
                framed = [framing(ids) for ids in tokens]
                vectors = embed_documents(embedder, framed, max_tokens_per_batch, device)
                write_shard(out, index, fmt, np.arange(first, summary.documents, dtype=np.int64), vectors)
                summary.shards_written += 1
                summary.tokens += sum(len(document) for document in framed)
                summary.truncated += sum(len(ids) > framing.max_seq_len - 2 for ids in tokens)
            bar.update(len(shard))
    if summary.documents == 0:
        raise EncodeError(f"{corpus.path} holds no documents")
    summary.seconds = time.perf_counter() - start
    return summary


# --- the command line -------------------------------------------------------------------------------
