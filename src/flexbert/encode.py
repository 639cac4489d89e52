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
:mod:`flexbert.data.sources`) or an MDS dataset it wrote. A document's position counts the corpus's
documents: blank lines hold none, and a record that gives none (bad JSON, no text) is refused,
since skipping it would shift every position after it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from flexbert.errors import FlexBertError, MissingFileError

if TYPE_CHECKING:  # torch is imported where used: the command line starts without it
    import torch

    from flexbert.embedders import Embedder

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
        shards = _mds_shards(path)
        return Corpus(path, True, sum(shard["samples"] for shard in shards), lambda: _mds_documents(path, shards))
    from flexbert.data.sources import find_inputs

    find_inputs([path])  # a missing or unsupported input fails now, before the model is built
    return Corpus(path, False, None, lambda: _text_documents(path, text_field))


def _text_documents(path: Path, text_field: str) -> Iterator[str]:
    from flexbert.data.sources import BadRecords, SourceError, iter_documents

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
    from streaming.base.compression import decompress
    from streaming.base.format.mds.reader import MDSReader

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


# --- tokens and batches -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Framing:
    """How a document becomes the model's input: [CLS] tokens [SEP], cut to ``max_seq_len``."""

    cls_id: int
    sep_id: int
    max_seq_len: int

    def __call__(self, tokens: np.ndarray | list[int]) -> np.ndarray:
        body = np.asarray(tokens, dtype=np.int64)[: self.max_seq_len - 2]
        return np.concatenate(([self.cls_id], body, [self.sep_id]))


def length_sorted_batches(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Document indices, longest first, cut into batches of at most ``max_tokens`` tokens (a longer
    document is a batch of its own)."""
    order = np.argsort(-lengths, kind="stable")
    batches, start, tokens = [], 0, 0
    for end, index in enumerate(order):
        if end > start and tokens + lengths[index] > max_tokens:
            batches.append(order[start:end])
            start, tokens = end, 0
        tokens += lengths[index]
    return batches + [order[start:]] if len(order) else batches


def embed_stream(embedder: Embedder, documents: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """[docs, hidden] float32 vectors of framed ``documents``, run as one unpadded stream."""
    import torch

    lengths = torch.tensor([len(document) for document in documents])
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    input_ids = torch.from_numpy(np.concatenate(documents))
    # bf16 where the tensor cores pay for it; the CPU computes in float32.
    precision = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with torch.inference_mode(), precision:
        vectors = embedder.model.embed(
            input_ids.to(device), cu_seqlens=cu_seqlens.to(device), max_seqlen=int(lengths.max())
        )
    return vectors.float().cpu()


def embed_documents(
    embedder: Embedder, documents: list[np.ndarray], max_tokens: int, device: torch.device
) -> np.ndarray:
    """[docs, hidden] float32 vectors of framed ``documents``, in their order, computed in
    length-sorted batches of at most ``max_tokens`` tokens."""
    lengths = np.array([len(document) for document in documents])
    vectors = np.empty((len(documents), embedder.config.hidden_size), dtype=np.float32)
    for batch in length_sorted_batches(lengths, max_tokens):
        vectors[batch] = embed_stream(embedder, [documents[i] for i in batch], device).numpy()
    return vectors


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
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    from flexbert.embedders import fitting_tokenizer

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
    import torch
    from tqdm import tqdm

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


def _cmd_encode(args: argparse.Namespace) -> int:
    from flexbert.embedders import load_embedder, with_max_seq_len

    corpus = open_corpus(args.input, args.text_field)
    embedder = load_embedder(args.model, args.pooling)
    if args.max_seq_len is not None:
        embedder = with_max_seq_len(embedder, args.max_seq_len, "--max-seq-len")
    if args.tokenizer is not None:
        embedder = dataclasses.replace(embedder, tokenizer_dir=Path(args.tokenizer))
    summary = encode_corpus(
        embedder,
        corpus,
        args.out,
        args.format,
        args.shard_size,
        args.max_tokens_per_batch,
        progress=not args.no_progress,
    )
    if summary.truncated:
        print(
            f"flexbert: note: {summary.truncated} documents were longer than {embedder.max_seq_len} tokens; "
            "their ends were cut",
            file=sys.stderr,
        )
    rate = summary.tokens / summary.seconds if summary.seconds else 0.0
    print(
        f"{args.out}: {summary.documents} documents; shards: {summary.shards_written} written, "
        f"{summary.shards_skipped} already there; {summary.tokens:,} tokens embedded in {summary.seconds:.1f}s "
        f"({rate:,.0f} tokens/s)"
    )
    return 0


def add_encode_command(commands: Any) -> None:
    """``encode`` under the command line's subcommands."""
    from flexbert.embedders import add_pooling_argument

    encode = commands.add_parser(
        "encode",
        help="embed a corpus into .npy or Parquet shards",
        description="Embed every document of INPUT with MODEL into OUT/part-NNNNN.npy (float32 "
        "[documents, hidden], with OUT/part-NNNNN.ids.npy holding each row's position in the corpus) or "
        "OUT/part-NNNNN.parquet (columns id and embedding), in corpus order. Documents are framed as "
        "[CLS] text [SEP], cut at --max-seq-len tokens, and embedded in unpadded, length-sorted batches "
        "(bf16 on a GPU). Running the same command again skips the shards already written. INPUT is a "
        "corpus as flexbert prepare mds reads it (JSON lines, Parquet, a folder of .txt/.md files, a saved "
        "dataset) or an MDS dataset it wrote.",
    )
    encode.add_argument(
        "model", metavar="MODEL", help="a checkpoint of this project, or a Hugging Face ModernBERT directory"
    )
    encode.add_argument("input", metavar="INPUT", help="the corpus: a file, a folder, or an MDS dataset folder")
    encode.add_argument("out", metavar="OUT", help="the folder of shards to write (or to complete)")
    add_pooling_argument(encode)
    encode.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="field (JSON lines) or column (Parquet, saved dataset) holding each document's text (default: text)",
    )
    encode.add_argument("--format", choices=("npy", "parquet"), default="npy", help="shard files (default: npy)")
    encode.add_argument(
        "--shard-size",
        type=int,
        default=DEFAULT_SHARD_SIZE,
        metavar="N",
        help=f"documents per shard, the unit a rerun skips (default: {DEFAULT_SHARD_SIZE})",
    )
    encode.add_argument(
        "--max-tokens-per-batch",
        type=int,
        default=DEFAULT_MAX_TOKENS_PER_BATCH,
        metavar="N",
        help=f"tokens per forward pass; a longer document goes alone (default: {DEFAULT_MAX_TOKENS_PER_BATCH})",
    )
    encode.add_argument(
        "--max-seq-len",
        type=int,
        metavar="N",
        help="cut documents at N tokens, [CLS] and [SEP] included (default: the fine-tune's max_seq_len, else "
        "the model's max_position_embeddings)",
    )
    encode.add_argument("--tokenizer", metavar="DIR", help="tokenizer for text input (default: the training one)")
    encode.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    encode.set_defaults(run=_cmd_encode)
