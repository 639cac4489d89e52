"""The data order: which pieces of which documents each optimizer step trained on, with which mask seed.

Every pretraining run records it unless its recipe says ``data_order: {record: false}``. Each rank
appends, as each step ends, one record to ``RUN_DIR/data_order/rank{R}.bin`` and one entry to
``rank{R}.idx``. All integers are little-endian:

- a record is a 32-byte header, ``magic "FBD1" | crc32 u32 | step i64 | mask_seed i64 | pieces u32 |
  4 zero bytes``, then one 18-byte entry per piece, ``stream u16 | sample u64 | start u32 | end u32``:
  tokens ``[start, end)`` of sample ``sample``, the index ``get_item`` takes in the run's streaming
  dataset (its samples numbered over the streams of ``train_loader.streams``, in order), from stream
  number ``stream`` of that list. The CRC covers the header after itself and the pieces;
- an index entry is ``step i64 | offset u64``, the record's position in the ``.bin`` file, written
  after the record, so that one step is found without reading the others.

The shard is not stored: the stream's MDS ``index.json`` lists its shards with their sample counts,
so :func:`stream_layout` finds it from the sample index when the record is read.

A killed process leaves at most its last record cut short (a prefix of the bytes it was writing):
readers drop it, and a resumed run first cuts both files back to their last whole record, then
appends. A resumed run trains again the steps after its checkpoint; their new records supersede the
killed run's, as :func:`~flexbert.train.loggers.read_step_lines` does for metrics: a record whose
step is not beyond the last one kept drops the kept records from that step on.

A piece's masks are drawn from the mask seed, the epoch it was read in and its key, so the records
of two phases (different seeds) never share masks, at the step's mask rate, which a schedule moves
from step to step (``train_loader.masking.mlm_probability``). The epoch is not recorded, nor the
rate: metrics.jsonl logs it at every step (``batch/mask_rate``), and ``flexbert data-order`` prints
it from there.
"""

from __future__ import annotations

import mmap
import os
import posixpath
import struct
import tempfile
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from streaming.base.world import World

from flexbert.core.checkpoint import RunDir
from flexbert.data.streams import NamedStream
from flexbert.errors import FlexBertError, MissingFileError, RunFolderError

MAGIC = b"FBD1"
# magic, crc32, step, mask_seed, pieces, padding (to 32 bytes)
HEADER = struct.Struct("<4sIqqI4x")
CRC_FROM = 8  # the CRC covers the header from here on, then the pieces
PIECE = np.dtype([("stream", "<u2"), ("sample", "<u8"), ("start", "<u4"), ("end", "<u4")])  # packed: 18 bytes
INDEX_ENTRY = np.dtype([("step", "<i8"), ("offset", "<u8")])
# What a piece's fields can hold; a batch beyond them (65,536 streams, a 4G-token document) stops.
LIMITS = {"stream": 0xFFFF, "sample": 2**63 - 1, "start": 0xFFFF_FFFF, "end": 0xFFFF_FFFF}


@dataclass
class DataOrderConfig:
    """``data_order:`` the record of each step's pieces and mask seed, RUN_DIR/data_order/."""

    record: bool = True  # about 18 bytes per piece and 48 per step and rank; see BENCHMARKS.md


def data_files(folder: Path, rank: int) -> tuple[Path, Path]:
    """The record file of ``rank`` and its index."""
    return folder / f"rank{rank}.bin", folder / f"rank{rank}.idx"


def pack_pieces(piece_keys: np.ndarray) -> np.ndarray:
    """The loader's ``piece_keys`` (int64 ``[pieces, 4]``: stream, sample, start, end) as records store them."""
    keys = np.asarray(piece_keys)
    if keys.ndim != 2 or keys.shape[1] != 4:
        raise ValueError(f"piece_keys must be [pieces, 4], got shape {keys.shape}")
    packed = np.empty(len(keys), PIECE)
    for column, name in enumerate(PIECE.names):
        values = keys[:, column]
        # One pass each over a few thousand ints: microseconds, and a silent wrap-around is impossible.
        if len(values) and (values.min() < 0 or values.max() > LIMITS[name]):
            raise ValueError(
                f"data order: a piece's {name} is outside [0, {LIMITS[name]}]: {values.min()}..{values.max()}"
            )
        packed[name] = values
    return packed


def encode_record(step: int, mask_seed: int, pieces: np.ndarray) -> bytes:
    """One record's bytes (``pieces`` as :func:`pack_pieces` makes them)."""
    payload = pieces.tobytes()
    header = bytearray(HEADER.pack(MAGIC, 0, step, mask_seed, len(pieces)))
    crc = zlib.crc32(payload, zlib.crc32(memoryview(header)[CRC_FROM:]))
    struct.pack_into("<I", header, 4, crc)
    return bytes(header) + payload


@dataclass(frozen=True)
class Record:
    step: int
    mask_seed: int
    pieces: np.ndarray  # of PIECE


def _record_at(buffer, offset: int) -> tuple[int, int] | None:
    """(step, end offset) of the whole, intact record at ``offset``, or None."""
    if offset + HEADER.size > len(buffer):
        return None
    magic, crc, step, _, count = HEADER.unpack_from(buffer, offset)
    end = offset + HEADER.size + count * PIECE.itemsize
    if magic != MAGIC or end > len(buffer):
        return None
    if zlib.crc32(memoryview(buffer)[offset + CRC_FROM : end]) != crc:
        return None
    return step, end


def decode_record(buffer, offset: int) -> Record:
    """The record at ``offset`` (which :func:`_scan` found whole)."""
    _, _, step, mask_seed, count = HEADER.unpack_from(buffer, offset)
    pieces = np.frombuffer(buffer, PIECE, count, offset + HEADER.size).copy()
    return Record(step, mask_seed, pieces)


@contextmanager
def _mapped(path: Path) -> Iterator[Any]:
    """The file's bytes, memory-mapped (read on demand: a step's lookup touches its record alone)."""
    if not path.is_file() or path.stat().st_size == 0:
        yield b""
        return
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        yield mapped


def _scan(buffer, index_path: Path | None) -> tuple[list[tuple[int, int]], int]:
    """(step, offset) of every whole record, in file order, superseded ones included, and where the
    whole records end. With ``index_path``, the index's entries are taken on trust except the last,
    which is checked (a repair killed half-way can leave entries beyond the records), and only what
    follows it is read; without it, every record is read and checked."""
    records: list[tuple[int, int]] = []
    end = 0
    if index_path is not None and index_path.is_file():
        entries = np.fromfile(index_path, INDEX_ENTRY, index_path.stat().st_size // INDEX_ENTRY.itemsize)
        while len(entries):
            last = _record_at(buffer, int(entries[-1]["offset"]))
            if last is not None and last[0] == int(entries[-1]["step"]):
                records = [(int(step), int(offset)) for step, offset in entries.tolist()]
                end = last[1]
                break
            entries = entries[:-1]
    while (found := _record_at(buffer, end)) is not None:
        records.append((found[0], end))
        end = found[1]
    return records, end


def _final(records: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The records of the steps the run finally trained: a step at or below the last one kept means a
    resumed run went back to its checkpoint, and the records from that step on are dropped."""
    kept: list[tuple[int, int]] = []
    for step, offset in records:
        while kept and kept[-1][0] >= step:
            kept.pop()
        kept.append((step, offset))
    return kept


class DataOrderWriter:
    """Appends records to one rank's files, each flushed at once (no fsync: a killed process loses
    nothing written, and only a machine that dies loses its page cache)."""

    def __init__(self, folder: Path, rank: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.data_path, self.index_path = data_files(folder, rank)
        with _mapped(self.data_path) as buffer:
            records, end = _scan(buffer, self.index_path)
        # Cut both files back to the whole records, so what this run appends follows the last of them.
        expected = np.array(records, INDEX_ENTRY).tobytes()
        if not self.index_path.is_file() or self.index_path.read_bytes() != expected:
            staged = self.index_path.with_suffix(".idx.tmp")
            staged.write_bytes(expected)
            os.replace(staged, self.index_path)
        if self.data_path.is_file() and self.data_path.stat().st_size != end:
            os.truncate(self.data_path, end)
        self._data = self.data_path.open("ab")
        self._index = self.index_path.open("ab")
        self._offset = end

    def append(self, step: int, mask_seed: int, piece_keys: np.ndarray) -> None:
        record = encode_record(step, mask_seed, pack_pieces(piece_keys))
        self._data.write(record)
        self._data.flush()
        # After the record: an entry never points at bytes that are not yet written.
        self._index.write(struct.pack("<qQ", step, self._offset))
        self._index.flush()
        self._offset += len(record)

    def close(self) -> None:
        self._data.close()
        self._index.close()


def forget_steps_from(folder: Path, rank: int, step: int) -> None:
    """Cut ``rank``'s files back to before the first step at or after ``step`` that they finally
    record: the run resumed at ``step`` on fewer processes, so no new record of this rank will
    supersede them. Every record after that one in the file is of a later step too (one of an
    earlier step would have superseded it), so the cut keeps the steps before ``step`` exactly."""
    data_path, index_path = data_files(folder, rank)
    with _mapped(data_path) as buffer:
        records, _ = _scan(buffer, index_path)
    cut = next((offset for recorded, offset in _final(records) if recorded >= step), None)
    if cut is None:
        return
    # The index first: an entry never points at bytes that are no longer there.
    staged = index_path.with_suffix(".idx.tmp")
    staged.write_bytes(np.array([entry for entry in records if entry[1] < cut], INDEX_ENTRY).tobytes())
    os.replace(staged, index_path)
    os.truncate(data_path, cut)


class DataOrderRecord(Callback):
    """Records each step's pieces (host values: no device sync) on every rank as the step ends."""

    def __init__(self, run_dir: str | Path, mask_seed: int):
        self.folder = RunDir(Path(run_dir)).data_order
        self.mask_seed = mask_seed
        self._writer: DataOrderWriter | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        if self._writer is None:  # a second fit() of the same trainer goes on appending
            self._writer = DataOrderWriter(self.folder, dist.get_global_rank())
            if dist.get_global_rank() == 0 and self.folder.is_dir():
                # A run resumed on fewer processes: the ranks that are gone trained nothing after
                # the checkpoint, whatever their files say of the steps the killed run went on to.
                resumed_at = state.timestamp.batch.value
                for path in self.folder.glob("rank*.bin"):
                    if (rank := int(path.stem.removeprefix("rank"))) >= dist.get_world_size():
                        forget_steps_from(self.folder, rank, resumed_at)

    def batch_end(self, state: State, logger: Logger) -> None:
        # The clock has already moved past the step that just ended; steps count as in metrics.jsonl.
        step = state.timestamp.batch.value - 1
        self._writer.append(step, self.mask_seed, state.batch["piece_keys"])

    def close(self, state: State, logger: Logger) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# --- reading -----------------------------------------------------------------------------------------


def _rank_files(run_dir: str | Path) -> dict[int, Path]:
    folder = RunDir(Path(run_dir)).data_order
    files = {int(path.stem.removeprefix("rank")): path for path in folder.glob("rank*.bin")}
    if not files:
        raise MissingFileError(
            f"{folder}: no data order recorded; was {run_dir} trained before it was recorded, or with "
            "data_order: {record: false}?"
        )
    return dict(sorted(files.items()))


def _warn_if_torn(path: Path, end: int, size: int) -> None:
    if end < size:
        warnings.warn(f"{path}: dropped its last {size - end} bytes, a record cut short by a killed run")


def read_data_order(run_dir: str | Path) -> dict[int, list[dict[str, Any]]]:
    """Per rank, the steps the run finally trained, in order, each ``{"step", "pieces", "mask_seed"}``
    with ``pieces`` as ``[[stream, sample, start, end], ...]``. Reads and checks every record."""
    result = {}
    for rank, path in _rank_files(run_dir).items():
        with _mapped(path) as buffer:
            records, end = _scan(buffer, None)
            _warn_if_torn(path, end, len(buffer))
            rows = []
            for _, offset in _final(records):
                record = decode_record(buffer, offset)
                pieces = np.stack([record.pieces[name].astype(np.int64) for name in PIECE.names], axis=1)
                rows.append({"step": record.step, "pieces": pieces.tolist(), "mask_seed": record.mask_seed})
        result[rank] = rows
    return result


def trained_pieces(run_dir: str | Path) -> Counter[tuple[int, int, int, int]]:
    """How many times the run trained on each (stream, sample, start, end) piece, over all steps and ranks."""
    return Counter(
        tuple(piece) for rows in read_data_order(run_dir).values() for row in rows for piece in row["pieces"]
    )


def recorded_steps(run_dir: str | Path) -> dict[int, list[int]]:
    """Per rank, the step of every whole record in the order written, superseded ones included."""
    steps = {}
    for rank, path in _rank_files(run_dir).items():
        with _mapped(path) as buffer:
            steps[rank] = [step for step, _ in _scan(buffer, None)[0]]
    return steps


def step_record(run_dir: str | Path, step: int) -> dict[int, Record]:
    """Per rank, the record of ``step`` as the run finally trained it, found through the index.
    One line if no rank recorded it."""
    found, recorded = {}, set()
    for rank, path in _rank_files(run_dir).items():
        with _mapped(path) as buffer:
            records, end = _scan(buffer, data_files(path.parent, rank)[1])
            _warn_if_torn(path, end, len(buffer))
            final = dict(_final(records))
            recorded.update(final)
            if step in final:
                found[rank] = decode_record(buffer, final[step])
    if not found:
        held = f"it records steps {step_ranges(sorted(recorded))}" if recorded else "it holds no whole record"
        raise RunFolderError(f"step {step} is not in the data order of {run_dir}: {held}")
    return found


def step_ranges(steps: Sequence[int]) -> str:
    """``0-5, 8-11``: sorted steps as runs of consecutive ones."""
    runs: list[list[int]] = []
    for step in steps:
        if runs and step == runs[-1][1] + 1:
            runs[-1][1] = step
        else:
            runs.append([step, step])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# --- from sample indices to streams, shards and text -------------------------------------------------


class StreamLayout:
    """Where the samples of a run's ``train_loader`` lie: the streams in order, each stream's shards
    read from its MDS ``index.json`` (downloaded for a remote stream without a local copy). The
    dataset numbers samples over the streams in order, and each stream's over its shards in order.
    A stream whose index cannot be read leaves its ``problem``; the samples of the streams after it
    cannot be placed either."""

    def __init__(self, streams: Mapping[str, Mapping[str, Any]]):
        self.names = list(streams)
        self.locations = [_location(config) for config in streams.values()]
        self.problems: dict[int, str] = {}
        # Where remote streams without a local copy put their index and shards; gone with this object.
        self._scratch = tempfile.TemporaryDirectory(prefix="flexbert-data-order-")
        self._streams: list[NamedStream | None] = []
        self._shards: list[list] = []
        self._firsts: list[int | None] = []  # the dataset index of each stream's first sample
        first: int | None = 0
        for number, (name, config) in enumerate(streams.items()):
            stream, shards = None, []
            index = Path(config.get("local") or "", config.get("split") or "", "index.json")
            if config.get("remote") is None and not index.is_file():
                self.problems[number] = f"no MDS dataset at {index.parent} ({index.name} missing): moved or deleted?"
            else:
                try:
                    stream = _open_stream(f"train_loader.streams.{name}", config, Path(self._scratch.name))
                    shards = stream.get_shards(World.detect(), allow_unsafe_types=False)
                except FlexBertError as err:
                    self.problems[number] = str(err)
            self._streams.append(stream)
            self._shards.append(shards)
            self._firsts.append(first)
            first = None if first is None or number in self.problems else first + sum(s.samples for s in shards)
        self._ends = [np.cumsum([shard.samples for shard in shards]) for shards in self._shards]

    def locate(self, stream: int, sample: int) -> tuple[str, int, int] | None:
        """(shard file name, index in the stream, index in the shard) of dataset sample ``sample`` of
        stream number ``stream``, or None where its stream's index (or an earlier one's) is unknown."""
        placed = self._place(stream, sample)
        if placed is None:
            return None
        shard, in_stream, in_shard = placed
        raw, zipped = self._shards[stream][shard].file_pairs[0]
        return (zipped or raw).basename, in_stream, in_shard

    def tokens(self, stream: int, sample: int) -> np.ndarray:
        """The token ids of a sample, read from its shard (fetched and decompressed as training does)."""
        placed = self._place(stream, sample)
        if placed is None:
            # Its own index, or an earlier stream's, which numbers the samples before it, is unknown.
            earlier = min(number for number in self.problems if number <= stream)
            raise RunFolderError(f"stream {self.names[earlier]!r}: {self.problems[earlier]}")
        shard, in_stream, in_shard = placed
        reader = self._shards[stream][shard]
        try:
            self._streams[stream].prepare_shard(reader)
            return np.asarray(reader.get_item(in_shard)["input_ids"])
        except Exception as err:  # a missing file, a failed download, a corrupt shard: as many as backends
            raise RunFolderError(
                f"cannot read sample {in_stream} of stream {self.names[stream]!r} from "
                f"{self.locations[stream]} ({type(err).__name__}: {err})"
            ) from None

    def _place(self, stream: int, sample: int) -> tuple[int, int, int] | None:
        first = self._firsts[stream]
        if first is None or stream in self.problems:
            return None
        ends = self._ends[stream]
        in_stream = sample - first
        if not 0 <= in_stream < (int(ends[-1]) if len(ends) else 0):
            raise RunFolderError(
                f"sample {sample} lies outside stream {self.names[stream]!r} ({self.locations[stream]}): "
                "has its data changed since the run?"
            )
        shard = int(np.searchsorted(ends, in_stream, side="right"))
        return shard, in_stream, in_stream - (int(ends[shard - 1]) if shard else 0)


def _location(config: Mapping[str, Any]) -> str:
    base = config.get("remote") or config.get("local")
    return posixpath.join(base, config["split"]) if config.get("split") else base


def _open_stream(key_path: str, config: Mapping[str, Any], scratch: Path) -> NamedStream:
    remote, local = config.get("remote"), config.get("local")
    # streaming refuses a default cache folder that already exists; a private one is always new.
    local = local if local is not None else tempfile.mkdtemp(dir=scratch)
    stream = NamedStream(key_path, remote=remote, local=local, split=config.get("split"))
    stream.apply_default(
        {"split": None, "download_retry": 2, "download_timeout": 60.0, "validate_hash": None, "keep_zip": True}
    )
    return stream


# What a recipe of an earlier version may still say; the typed config answers each key with its line.
RETIRED_RECIPE_KEYS = MappingProxyType(
    {
        "debug": "retired: its one key, log_sample_ids, became data_order.record, which is on by default "
        "(each step's pieces and mask seed go to RUN_DIR/data_order/; flexbert data-order RUN --step N "
        "prints them); delete the debug section (data_order: {record: false} turns the record off)"
    }
)
