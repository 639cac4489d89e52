"""Documents from raw corpora: text folders, JSON lines (plain, gzip, zstd), Parquet, saved HF datasets.

A corpus is a list of paths. Each path is found to be a set of *inputs* (one file, or one saved
dataset); a folder stands for the supported files and saved datasets under it, recursively, in sorted
order, with hidden entries skipped. Inputs are cut into *slices*, pieces that a worker can read on
its own: byte ranges of plain JSON lines, groups of row groups or rows, groups of text files.
Compressed files cannot be entered in the middle, so each is one slice. Reading the slices in order
gives the corpus in order, whatever the cut.

A record that cannot give a document (a line that is not UTF-8 or not JSON, a missing or non-string
text field) is *bad*: it is counted by reason and skipped, so a caller can decide how many are too
many, and the first of each reason is located so that an error can say where to look. A structural
problem (a missing path, a column that is absent or not text, a corrupt archive) is a ``SourceError``.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from flexbert.errors import FlexBertError

# Longest suffix first, so that "a.jsonl.gz" is not taken for plain JSON lines.
SUFFIX_KINDS = {
    ".jsonl.gz": "jsonl.gz",
    ".jsonl.zst": "jsonl.zst",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
}
SAVED_DATASET = "saved_dataset"  # a folder written by datasets' save_to_disk
BAD_REASONS = ("invalid_utf8", "invalid_json", "missing_field", "not_a_string")
_ARROW_BATCH_ROWS = 1024


class SourceError(FlexBertError, ValueError):
    """An input is missing, of an unsupported kind, or unreadable as a whole."""


@dataclass
class BadRecords:
    """Records that gave no document: how many, by reason, and where the first of each reason is
    (a file, and its line, byte offset or row)."""

    counts: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, where)

    def merge(self, other: BadRecords) -> None:
        """Add ``other``'s records, which come after these in the corpus."""
        self.counts.update(other.counts)
        for reason, where in other.first.items():
            self.first.setdefault(reason, where)

    def describe(self) -> str:
        """``invalid_utf8: 2, first in a.jsonl, line at byte 120; ...``"""
        return "; ".join(
            f"{reason}: {count:,}, first in {self.first[reason]}" for reason, count in sorted(self.counts.items())
        )


@dataclass(frozen=True)
class Input:
    kind: str  # a value of SUFFIX_KINDS, or SAVED_DATASET
    path: str

    def signature(self) -> list:
        """Sizes and modification times of its files: a resumed conversion must read the same data."""
        path = Path(self.path)
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        return [[file.name, file.stat().st_size, file.stat().st_mtime_ns] for file in files]


@dataclass(frozen=True)
class Slice:
    """A piece of the corpus that one worker reads on its own."""

    kind: str
    paths: tuple[str, ...]  # several only for text files, one document each
    start: int = 0  # JSON lines: byte offset; Parquet: row group; saved dataset: row
    stop: int | None = None  # exclusive; None reads to the end
    weight: int = 0  # bytes of input it stands for: sizes units and drives progress bars


def find_inputs(paths: Iterable[str | os.PathLike]) -> list[Input]:
    """The inputs that ``paths`` stand for, in order; a folder is expanded recursively."""
    inputs = []
    for path in map(Path, paths):
        if not path.exists():
            raise SourceError(f"input not found: {path} does not exist")
        if path.is_dir() and not _saved_dataset(path):
            found = list(_expand(path))
            if not found:
                raise SourceError(
                    f"no input files under {path}: looked for {', '.join(SUFFIX_KINDS)} files "
                    "and datasets saved with save_to_disk"
                )
            inputs += found
        else:
            inputs.append(_input(path))
    return inputs


def _saved_dataset(folder: Path) -> bool:
    if (folder / "dataset_dict.json").is_file():
        raise SourceError(f"{folder} holds a DatasetDict; pass the folder of one split, e.g. {folder / 'train'}")
    return (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()


def _kind(path: Path) -> str | None:
    return next((kind for suffix, kind in SUFFIX_KINDS.items() if path.name.endswith(suffix)), None)


def _input(path: Path) -> Input:
    if path.is_dir():
        return Input(SAVED_DATASET, str(path))
    kind = _kind(path)
    if kind is None:
        raise SourceError(
            f"{path}: unsupported input; expected a folder, a dataset saved with save_to_disk, "
            f"or a file ending in {', '.join(SUFFIX_KINDS)}"
        )
    return Input(kind, str(path))


def _expand(folder: Path) -> Iterator[Input]:
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from [_input(entry)] if _saved_dataset(entry) else _expand(entry)
        elif _kind(entry) is not None:
            yield _input(entry)


def plan_slices(inputs: list[Input], text_field: str, unit_bytes: int | None) -> list[Slice]:
    """Cut ``inputs`` into slices of about ``unit_bytes`` each (None: as few slices as possible)."""
    limit = unit_bytes or math.inf
    slices: list[Slice] = []
    for is_text, run in itertools.groupby(inputs, key=lambda item: item.kind == "text"):
        if is_text:
            slices += _text_slices([item.path for item in run], limit)
        else:
            for item in run:
                slices += _SLICERS[item.kind](item, text_field, limit)
    return slices


def _text_slices(paths: list[str], limit: float) -> list[Slice]:
    slices, group, weight = [], [], 0
    for path in paths:
        size = os.path.getsize(path)
        if group and weight + size > limit:
            slices.append(Slice("text", tuple(group), weight=weight))
            group, weight = [], 0
        group.append(path)
        weight += size
    return slices + [Slice("text", tuple(group), weight=weight)]


def _jsonl_slices(item: Input, text_field: str, limit: float) -> list[Slice]:
    size = os.path.getsize(item.path)
    step = int(min(limit, size)) or 1
    return [
        Slice(item.kind, (item.path,), start, min(start + step, size), min(step, size - start))
        for start in range(0, size, step)
    ]


def _whole_file(item: Input, text_field: str, limit: float) -> list[Slice]:
    return [Slice(item.kind, (item.path,), weight=os.path.getsize(item.path))]


def _check_text_column(schema: pa.Schema, text_field: str, where: str) -> None:
    if text_field not in schema.names:
        raise SourceError(
            f"{where}: no column {text_field!r} (columns: {', '.join(schema.names)}); "
            "choose the text column with --text-field"
        )
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise SourceError(f"{where}: column {text_field!r} holds {kind}, not text")


def _parquet_slices(item: Input, text_field: str, limit: float) -> list[Slice]:
    path = item.path
    try:
        metadata = pq.ParquetFile(path).metadata
    except (OSError, pa.ArrowException) as err:
        raise SourceError(f"{path}: not a readable Parquet file ({err})") from None
    _check_text_column(metadata.schema.to_arrow_schema(), text_field, path)
    slices, start, weight = [], 0, 0
    for group in range(metadata.num_row_groups):
        weight += metadata.row_group(group).total_byte_size
        if weight >= limit or group == metadata.num_row_groups - 1:
            slices.append(Slice("parquet", (path,), start, group + 1, weight))
            start, weight = group + 1, 0
    return slices


def _load_saved_dataset(path: str):
    import datasets  # imported here: it takes seconds, and most corpora are files

    dataset = datasets.load_from_disk(path)
    if not isinstance(dataset, datasets.Dataset):
        raise SourceError(f"{path}: holds a {type(dataset).__name__}; pass the folder of one split")
    return dataset


def _saved_dataset_slices(item: Input, text_field: str, limit: float) -> list[Slice]:
    dataset = _load_saved_dataset(item.path)
    _check_text_column(dataset.data.schema, text_field, item.path)
    rows, size = dataset.num_rows, dataset.data.nbytes
    step = max(1, int(min(limit * rows / max(size, 1), rows)))
    return [
        Slice(SAVED_DATASET, (item.path,), start, stop, size * (stop - start) // rows)
        for start in range(0, rows, step)
        for stop in [min(start + step, rows)]
    ]


_SLICERS = {
    "jsonl": _jsonl_slices,
    "jsonl.gz": _whole_file,
    "jsonl.zst": _whole_file,
    "parquet": _parquet_slices,
    SAVED_DATASET: _saved_dataset_slices,
}


def read_slice(piece: Slice, text_field: str, bad: BadRecords) -> Iterator[tuple[str, int]]:
    """Yield (document text, how many of the slice's ``weight`` bytes lie behind it).

    Bad records are counted into ``bad`` by reason (see BAD_REASONS) and skipped.
    """
    return _READERS[piece.kind](piece, text_field, bad)


def _read_text_files(piece: Slice, text_field: str, bad: BadRecords) -> Iterator[tuple[str, int]]:
    done = 0
    for path in piece.paths:
        data = Path(path).read_bytes()
        done += len(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            bad.add("invalid_utf8", f"{path}, byte {err.start}")
        else:
            yield text, done


def _parse_line(line: bytes, text_field: str) -> tuple[str | None, str | None]:
    """(the line's text, None), or (None, why it is a bad record); (None, None) for a blank line."""
    if not line.strip():  # a blank line holds no record, so it is not a bad one
        return None, None
    try:
        # Decoding first: json.loads would guess UTF-16 or UTF-32 from bytes.
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    except json.JSONDecodeError:
        return None, "invalid_json"
    if not isinstance(record, dict) or text_field not in record:
        return None, "missing_field"
    text = record[text_field]
    if not isinstance(text, str):
        return None, "not_a_string"
    try:
        text.encode("utf-8")  # JSON can escape lone surrogates, which are no text at all
    except UnicodeEncodeError:
        return None, "invalid_utf8"
    return text, None


def _read_jsonl(piece: Slice, text_field: str, bad: BadRecords) -> Iterator[tuple[str, int]]:
    """The lines that start inside [start, stop): a line crossing a cut belongs to the slice it starts in."""
    with open(piece.paths[0], "rb") as file:
        position = piece.start
        if position:
            file.seek(position - 1)
            position += len(file.readline()) - 1  # the rest of a line begun before the cut
        while position < piece.stop:
            line = file.readline()
            if not line:
                break
            # A slice starts mid-file, so it knows byte offsets but not line numbers.
            text, reason = _parse_line(line, text_field)
            if reason is not None:
                bad.add(reason, f"{piece.paths[0]}, the line at byte {position}")
            position += len(line)
            if text is not None:
                yield text, min(position - piece.start, piece.weight)


def _zstd_lines(raw: BinaryIO) -> Iterator[bytes]:
    """The lines of every frame in ``raw``; a frame cut short raises EOFError.

    zstandard's own stream reader ends quietly there, which would lose a file's tail unnoticed.
    """
    decompressor = zstandard.ZstdDecompressor()
    frame, inside, rest = decompressor.decompressobj(), False, b""
    for compressed in iter(lambda: raw.read(1 << 20), b""):
        text = [rest]
        while compressed:  # a chunk can end one frame and start the next: parallel compressors write many
            text.append(frame.decompress(compressed))
            inside = not frame.eof
            compressed = b"" if inside else frame.unused_data
            if not inside:
                frame = decompressor.decompressobj()
        *lines, rest = b"".join(text).split(b"\n")
        yield from lines
    if inside:
        raise EOFError("the last zstd frame is cut short")
    if rest:
        yield rest


def _read_compressed_jsonl(piece: Slice, text_field: str, bad: BadRecords) -> Iterator[tuple[str, int]]:
    with open(piece.paths[0], "rb") as raw:
        lines = gzip.GzipFile(fileobj=raw) if piece.kind == "jsonl.gz" else _zstd_lines(raw)
        try:
            for number, line in enumerate(lines, start=1):
                text, reason = _parse_line(line, text_field)
                if reason is not None:
                    bad.add(reason, f"{piece.paths[0]}, line {number}")
                if text is not None:
                    yield text, min(raw.tell(), piece.weight)
        except (OSError, EOFError, zstandard.ZstdError) as err:
            raise SourceError(f"{piece.paths[0]}: corrupt or truncated archive ({err})") from None


def _arrow_texts(
    columns: Iterable[pa.Array], path: str, first_row: int, rows: int, weight: int, bad: BadRecords
) -> Iterator[tuple[str, int]]:
    done = 0
    for column in columns:
        for text in column.to_pylist():
            if text is None:
                bad.add("missing_field", f"{path}, row {first_row + done}")
            done += 1
            if text is not None:
                yield text, weight * done // rows


def _read_parquet(piece: Slice, text_field: str, bad: BadRecords) -> Iterator[tuple[str, int]]:
    file = pq.ParquetFile(piece.paths[0])
    groups = range(piece.start, piece.stop)
    rows = sum(file.metadata.row_group(group).num_rows for group in groups)
    first_row = sum(file.metadata.row_group(group).num_rows for group in range(piece.start))
    batches = file.iter_batches(_ARROW_BATCH_ROWS, row_groups=groups, columns=[text_field])
    return _arrow_texts((batch.column(0) for batch in batches), piece.paths[0], first_row, rows, piece.weight, bad)


def _read_saved_dataset(piece: Slice, text_field: str, bad: BadRecords) -> Iterator[tuple[str, int]]:
    table = _load_saved_dataset(piece.paths[0]).select_columns([text_field]).with_format("arrow")
    starts = range(piece.start, piece.stop, _ARROW_BATCH_ROWS)
    columns = (table[start : min(start + _ARROW_BATCH_ROWS, piece.stop)].column(0) for start in starts)
    return _arrow_texts(columns, piece.paths[0], piece.start, piece.stop - piece.start, piece.weight, bad)


_READERS = {
    "text": _read_text_files,
    "jsonl": _read_jsonl,
    "jsonl.gz": _read_compressed_jsonl,
    "jsonl.zst": _read_compressed_jsonl,
    "parquet": _read_parquet,
    SAVED_DATASET: _read_saved_dataset,
}


def iter_documents(
    paths: Iterable[str | os.PathLike], text_field: str = "text", bad: BadRecords | None = None
) -> Iterator[str]:
    """Every document of the corpus at ``paths``, in order; bad records are counted into ``bad``."""
    bad = BadRecords() if bad is None else bad
    for piece in plan_slices(find_inputs(paths), text_field, unit_bytes=None):
        for text, _ in read_slice(piece, text_field, bad):
            yield text
