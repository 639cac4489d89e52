"""Raw corpora to pre-tokenized MDS: one sample per document, one column ``input_ids``.

The layout is a contract with the training loader, which packs documents itself:

    OUTPUT/index.json               the dataset's MDS index, written last: it exists iff the output is complete
    OUTPUT/unit-00000/...           MDS shards (and the unit's own index) for one slice of the corpus
    OUTPUT/conversion/plan.json     what is being converted: inputs, tokenizer, settings
    OUTPUT/conversion/unit-*.json   one per finished unit: counts and shard entries

Each sample is ``{"input_ids": ndarray}`` of dtype uint16 when the vocabulary fits (uint32 otherwise),
the document's token ids without special tokens, never truncated; shards are zstd-compressed.
Documents keep corpus order whatever the number of workers.

The corpus is cut into units (see sources.plan_slices); workers convert units independently and the
parent records each finished one. An interrupted conversion leaves no index.json, and running it
again with the same inputs and settings converts only the units not recorded yet; with anything
changed it starts over. A full disk stops it the same way, with a ConversionError: finished units
are kept, the unit being written is removed, and no partial file is left. OUTPUT may be
``s3://bucket/prefix`` (endpoint from ``S3_ENDPOINT_URL``): units are uploaded as they finish and
index.json goes up last.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import multiprocessing
import os
import queue
import re
import shutil
import signal
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flexbert.core.sources import BadRecords, Slice, SourceError, find_inputs, plan_slices, read_slice
from flexbert.core.tokenizer import MLMTokenizer, load_tokenizer
from flexbert.errors import FlexBertError

COLUMN = "input_ids"
INDEX = "index.json"
PLAN = "conversion/plan.json"
DEFAULT_SHARD_SIZE = "64MB"
DEFAULT_UNIT_SIZE = "32MB"
DEFAULT_MAX_BAD_FRACTION = 0.001
LAYOUT = "flexbert-mds-documents-2"  # bump when the output layout changes: old partial outputs restart
_BATCH_CHARS_PER_THREAD = 1 << 22  # text per encode_batch call and thread: enough to keep threads busy
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "gb": 1 << 30,
    "gib": 1 << 30,
    "tb": 1 << 40,
    "tib": 1 << 40,
}


class ConversionError(FlexBertError, ValueError):
    """The conversion cannot be done as asked; nothing that looks complete was written."""


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like "64MB" (powers of 1024, as in mosaicml-streaming)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", size.lower())
    if match is None or match[2] not in _SIZE_UNITS:
        raise ConversionError(f"not a size: {size!r} (examples: 1048576, 512KB, 64MB, 1GB)")
    return int(float(match[1]) * _SIZE_UNITS[match[2]])


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Tally:
    documents: int = 0  # written, one sample each
    empty: int = 0  # no tokens at all: skipped
    tokens: int = 0
    text_bytes: int = 0  # UTF-8 bytes of the documents' text
    bad: BadRecords = field(default_factory=BadRecords)  # records that gave no document

    def add(self, other: Tally) -> None:
        """Add ``other``, which comes after this in the corpus."""
        self.documents += other.documents
        self.empty += other.empty
        self.tokens += other.tokens
        self.text_bytes += other.text_bytes
        self.bad.merge(other.bad)

    @property
    def records(self) -> int:
        return self.documents + self.empty + sum(self.bad.counts.values())


@dataclass(frozen=True)
class UnitJob:
    name: str
    piece: Slice
    output: str
    text_field: str
    dtype: str
    shard_size: int
    threads: int  # the tokenizer's


@dataclass(frozen=True)
class UnitResult:
    name: str
    tally: Tally
    shards: list[dict]  # the unit's MDS index entries, basenames relative to the unit

    def to_json(self) -> bytes:
        return json.dumps({**vars(self.tally), "bad": vars(self.tally.bad), "shards": self.shards}).encode()

    @classmethod
    def from_json(cls, name: str, data: bytes) -> UnitResult:
        record = json.loads(data)
        shards, bad = record.pop("shards"), record.pop("bad")
        return cls(name, Tally(**record, bad=BadRecords(Counter(bad["counts"]), bad["first"])), shards)


@dataclass(frozen=True)
class ConversionSummary:
    output: str
    total: Tally
    units: int
    resumed_units: int  # finished by an earlier, interrupted run
    tokens_this_run: int
    seconds: float

    def line(self) -> str:
        total = self.total
        bad = sum(total.bad.counts.values())
        reasons = ", ".join(f"{reason} {count:,}" for reason, count in sorted(total.bad.counts.items()))
        return (
            f"{total.documents:,} documents, {total.tokens:,} tokens, {total.text_bytes / 1e6:,.1f} MB of text; "
            f"{self.tokens_this_run / max(self.seconds, 1e-9):,.0f} tokens/s over {self.seconds:.1f} s; "
            f"bad lines: {bad:,}{f' ({reasons})' if bad else ''}; {total.empty:,} empty documents skipped; "
            f"{self.units} units ({self.resumed_units} resumed) in {self.output}"
        )


# --- Where the output goes: a local folder or an S3 prefix, with the same layout --------------------


def _is_remote(output: str) -> bool:
    return urllib.parse.urlparse(output).scheme != ""


class _LocalOutput:
    def __init__(self, root: str):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise ConversionError(f"output {root} exists and is not a folder")

    def exists(self, name: str) -> bool:
        return (self.root / name).exists()

    def is_empty(self) -> bool:
        return not self.root.exists() or not any(self.root.iterdir())

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        """Write atomically: a crash leaves the old file or the new one, never a torn one."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        try:
            partial.write_bytes(data)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)  # there only if the write failed (a full disk)

    def names(self, prefix: str) -> list[str]:
        folder, _, stem = prefix.rpartition("/")
        if not (self.root / folder).is_dir():
            return []
        return [f"{folder}/{path.name}" for path in (self.root / folder).iterdir() if path.name.startswith(stem)]

    def clear(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)


class _S3Output:
    def __init__(self, url: str):
        import boto3  # imported here: only remote outputs need it
        from botocore.exceptions import BotoCoreError, ClientError

        parsed = urllib.parse.urlparse(url)
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.client = boto3.session.Session().client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL"))
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as err:
            raise ConversionError(f"cannot use bucket {self.bucket!r} for {url}: {err}") from None

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def exists(self, name: str) -> bool:
        return bool(self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(name), MaxKeys=1).get("KeyCount"))

    def is_empty(self) -> bool:
        return not self.exists("")

    def read(self, name: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()

    def write(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def _keys(self, prefix: str) -> Iterator[str]:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            yield from (item["Key"] for item in page.get("Contents", []))

    def names(self, prefix: str) -> list[str]:
        return [key.removeprefix(self._key("")) for key in self._keys(prefix)]

    def clear(self) -> None:
        keys = list(self._keys(""))
        for start in range(0, len(keys), 1000):  # the most one request may delete
            objects = [{"Key": key} for key in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})


def _open_output(output: str) -> _LocalOutput | _S3Output:
    scheme = urllib.parse.urlparse(output).scheme
    if scheme == "":
        return _LocalOutput(output)
    if scheme == "s3":
        return _S3Output(output)
    raise ConversionError(f"unsupported output {output}: expected a local folder or s3://bucket/prefix")


def _unit_location(output: str, name: str) -> tuple[str, str | None]:
    """Where a unit's writer puts its shards: (local folder, remote folder or None)."""
    if _is_remote(output):
        return tempfile.mkdtemp(prefix=f"{name}-"), f"{output.rstrip('/')}/{name}"
    local = os.path.join(output, name)
    shutil.rmtree(local, ignore_errors=True)  # left by an interrupted run
    return local, None


def _finished_units(destination: _LocalOutput | _S3Output, plan: bytes, overwrite: bool, output: str) -> set[str]:
    """Make ``destination`` ready for ``plan``; return the units an interrupted run of it finished."""
    if destination.exists(INDEX):
        if not overwrite:
            raise ConversionError(
                f"output {output} already holds a complete dataset ({INDEX}); pass --overwrite to replace it"
            )
        destination.clear()
    elif destination.exists(PLAN):
        if not overwrite and json.loads(destination.read(PLAN)) == json.loads(plan):
            return {Path(name).stem for name in destination.names("conversion/unit-") if name.endswith(".json")}
        destination.clear()  # an interrupted conversion of other inputs or settings
    elif not destination.is_empty():
        raise ConversionError(f"output {output} is not empty and holds no dataset; refusing to write into it")
    destination.write(PLAN, plan)
    return set()


def _root_index(results: list[UnitResult]) -> bytes:
    """The dataset's index: every unit's shards in unit order, their files named from the root."""
    shards = []
    for result in sorted(results, key=lambda result: result.name):
        for shard in result.shards:
            shards.append(
                {
                    key: {**value, "basename": f"{result.name}/{value['basename']}"}
                    if isinstance(value, dict) and "basename" in value
                    else value
                    for key, value in shard.items()
                }
            )
    return json.dumps({"version": 2, "shards": shards}, sort_keys=True).encode()


# --- Converting one unit ---------------------------------------------------------------------------


def _batches(documents: Iterator[tuple[str, int]], chars: int) -> Iterator[list[tuple[str, int]]]:
    batch, size = [], 0
    for document in documents:
        batch.append(document)
        size += len(document[0])
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _tokenized(
    batches: Iterator[list[tuple[str, int]]], tokenizer: MLMTokenizer
) -> Iterator[tuple[list[tuple[str, int]], list[list[int]]]]:
    """Each batch with its token ids; the next batch is tokenized (outside the GIL) while this one is written."""
    with ThreadPoolExecutor(1) as tokenizing:
        previous = None
        for batch in batches:
            ids = tokenizing.submit(tokenizer.encode_batch, [text for text, _ in batch])
            if previous is not None:
                yield previous[0], previous[1].result()
            previous = batch, ids
        if previous is not None:
            yield previous[0], previous[1].result()


def _write_shards(
    job: UnitJob, out: str | tuple[str, str], tokenizer: MLMTokenizer, advance: Callable[[int], object]
) -> Tally:
    # Imported here, not at the top: streaming loads torch and transformers, seconds that argument
    # errors should not wait for.
    from streaming import MDSWriter

    writer = MDSWriter(
        columns={COLUMN: f"ndarray:{job.dtype}"},
        out=out,
        keep_local=True,
        compression="zstd",
        size_limit=job.shard_size,
    )
    tally, reported = Tally(), 0
    batches = _batches(read_slice(job.piece, job.text_field, tally.bad), _BATCH_CHARS_PER_THREAD * job.threads)
    for batch, token_ids in _tokenized(batches, tokenizer):
        for ids in token_ids:
            if ids:
                writer.write({COLUMN: np.asarray(ids, dtype=job.dtype)})
                tally.documents += 1
                tally.tokens += len(ids)
            else:
                tally.empty += 1
        tally.text_bytes += sum(len(text.encode("utf-8")) for text, _ in batch)
        advance(batch[-1][1] - reported)
        reported = batch[-1][1]
    writer.finish()  # uploads, if remote, before returning
    advance(job.piece.weight - reported)
    return tally


def _write_unit(job: UnitJob, tokenizer: MLMTokenizer, advance: Callable[[int], object]) -> UnitResult:
    """Tokenize one slice into MDS shards; ``advance`` hears how many input bytes were done."""
    local, remote = _unit_location(job.output, job.name)
    try:
        tally = _write_shards(job, local if remote is None else (local, remote), tokenizer, advance)
        shards = json.loads(Path(local, INDEX).read_bytes())["shards"]
    except BaseException:
        shutil.rmtree(local, ignore_errors=True)  # half a unit, which a rerun writes again: free its space now
        raise
    finally:
        if remote is not None:
            shutil.rmtree(local, ignore_errors=True)  # a staging copy of what was uploaded
    return UnitResult(job.name, tally, shards)


def _tokenizer_threads(threads: int) -> dict[str, str]:
    """Environment that keeps the tokenizer's own thread pool to ``threads``."""
    return {"TOKENIZERS_PARALLELISM": "true" if threads > 1 else "false", "RAYON_NUM_THREADS": str(threads)}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_worker: tuple[MLMTokenizer, Callable[[int], object]] | None = None


def _start_worker(tokenizer_path: str, environ: dict[str, str], progress: multiprocessing.Queue) -> None:
    # Ctrl-C reaches every process in the group; the parent alone decides what happens.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Forked from a server started earlier, a worker would otherwise see that moment's environment
    # (S3 endpoint and credentials included).
    os.environ.clear()
    os.environ.update(environ)
    global _worker
    _worker = (load_tokenizer(tokenizer_path), progress.put)


def _write_unit_in_worker(job: UnitJob) -> UnitResult:
    tokenizer, advance = _worker
    return _write_unit(job, tokenizer, advance)


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers start clean, never forked from a parent whose tokenizer threads may hold locks.

    A fork server is started once per process with the slow imports done, so later pools start fast.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["flexbert.data.convert", "streaming"])
    return context


def _run_units(
    jobs: list[UnitJob],
    tokenizer: MLMTokenizer,
    tokenizer_path: str,
    processes: int,
    threads: int,
    progress: bool,
    record: Callable[[UnitResult], None],
) -> None:
    """Convert ``jobs`` in ``processes`` processes (1: this one), calling ``record`` here as each finishes."""
    bar = tqdm(
        total=sum(job.piece.weight for job in jobs),
        unit="B",
        unit_scale=True,
        desc="convert_to_mds",
        disable=not progress,
    )
    tokens = 0

    def finished(result: UnitResult) -> None:
        nonlocal tokens
        record(result)
        tokens += result.tally.tokens
        bar.set_postfix(tokens=f"{tokens:,}")

    with bar:
        if processes == 1:
            with _environment(_tokenizer_threads(threads)):
                for job in jobs:
                    finished(_write_unit(job, tokenizer, bar.update))
            return
        context = _worker_context()
        updates = context.Queue()
        environ = {**os.environ, **_tokenizer_threads(threads)}
        with context.Pool(processes, _start_worker, (tokenizer_path, environ, updates)) as pool:
            results = pool.imap_unordered(_write_unit_in_worker, jobs)
            for _ in jobs:
                finished(_next_result(results, updates, bar))
            _drain(updates, bar)


def _next_result(results: Iterator[UnitResult], updates: multiprocessing.Queue, bar: tqdm) -> UnitResult:
    """The next unit a worker finishes, moving the bar while waiting."""
    while True:
        _drain(updates, bar)
        try:
            return results.next(timeout=0.2)
        except multiprocessing.TimeoutError:
            pass


def _drain(updates: multiprocessing.Queue, bar: tqdm) -> None:
    while True:
        try:
            bar.update(updates.get_nowait())
        except queue.Empty:
            return


@contextlib.contextmanager
def _full_disk_explained(output: str) -> Iterator[None]:
    """A full disk or quota becomes one ConversionError that says what to do."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise ConversionError(
            f"no space left on the device while writing {output} ({err.filename or err.strerror}); "
            "the units finished so far are kept: free some space and run the same command "
            "again to resume"
        ) from None


def _record_name(unit: str) -> str:
    return f"conversion/{unit}.json"


def _record(destination: _LocalOutput | _S3Output, result: UnitResult) -> None:
    """Mark a unit finished: from here on, an interrupted run resumes after it."""
    destination.write(_record_name(result.name), result.to_json())


# --- The conversion --------------------------------------------------------------------------------


def convert_to_mds(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    tokenizer: str | os.PathLike,
    *,
    text_field: str = "text",
    workers: int | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    overwrite: bool = False,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    unit_size: int | str = DEFAULT_UNIT_SIZE,
    progress: bool = True,
    part: tuple[int, int] | None = None,
) -> ConversionSummary:
    """Tokenize the documents at ``inputs`` into an MDS dataset at ``output`` (a folder or s3:// URL).

    ``workers`` processes (default: every available core) convert units of about ``unit_size`` input
    bytes each; with one worker or one unit left, the conversion runs in this process. Bad records
    are skipped, and fail the conversion only when more than ``max_bad_fraction`` of all records are
    bad. Raises a ValueError subclass (ConversionError, SourceError, TokenizerError) for anything
    wrong with the request, leaving no output that looks complete.

    ``part=(i, n)`` converts only the i-th of n contiguous runs of units, into ``output/part-i-of-n``:
    n jobs on n machines convert a corpus together, each part complete and resumable on its own,
    and :func:`merge_parts` then joins them into one dataset with the documents in corpus order.
    """
    started = time.perf_counter()
    output = str(output) if _is_remote(str(output)) else os.path.abspath(output)
    workers = available_cores() if workers is None else workers
    if workers < 1:
        raise ConversionError(f"workers must be at least 1, got {workers}")
    if not 0 <= max_bad_fraction <= 1:
        raise ConversionError(f"max_bad_fraction must lie in [0, 1], got {max_bad_fraction}")
    shard_bytes, unit_bytes = parse_size(shard_size), parse_size(unit_size)
    if not 0 < shard_bytes < 1 << 32 or unit_bytes <= 0:  # MDS stores offsets in a shard as uint32
        raise ConversionError(
            f"shard size must lie in (0, 4GB) and unit size be positive; got {shard_size} and {unit_size}"
        )
    mlm = load_tokenizer(tokenizer)
    found = find_inputs(inputs)
    pieces = plan_slices(found, text_field, unit_bytes)
    units = list(enumerate(pieces))
    if part is not None:
        index, parts = part
        if not 0 <= index < parts:
            raise ConversionError(f"part {index}/{parts}: the part must lie in 0 .. {parts - 1}")
        units = units[index * len(units) // parts : (index + 1) * len(units) // parts]
        if not units:
            raise ConversionError(
                f"part {index}/{parts} gets no unit: the corpus is cut into {len(pieces)} units of about "
                f"{unit_bytes:,} bytes; use fewer parts or a smaller --unit-size"
            )
        output = _join(output, part_folder(index, parts))
    dtype = "uint16" if mlm.vocab_size <= 1 << 16 else "uint32"
    plan = json.dumps(
        {
            "layout": LAYOUT,
            "text_field": text_field,
            "dtype": dtype,
            "shard_size": shard_bytes,
            "unit_size": unit_bytes,
            "part": list(part) if part is not None else None,
            "tokenizer_sha256": hashlib.sha256(mlm.tokenizer.to_str().encode()).hexdigest(),
            "inputs": [
                {"kind": item.kind, "path": os.path.abspath(item.path), "files": item.signature()} for item in found
            ],
        },
        indent=1,
    ).encode()

    destination = _open_output(output)
    with _full_disk_explained(output):
        finished = _finished_units(destination, plan, overwrite, output)
        results = [UnitResult.from_json(name, destination.read(_record_name(name))) for name in sorted(finished)]
        todo = [
            (name, piece)
            for name, piece in ((f"unit-{index:05d}", piece) for index, piece in units)
            if name not in finished
        ]
        processes = max(1, min(workers, len(todo)))
        threads = workers // processes  # cores that no process takes go to the tokenizer's threads
        jobs = [UnitJob(name, piece, output, text_field, dtype, shard_bytes, threads) for name, piece in todo]

        def record(result: UnitResult) -> None:
            _record(destination, result)
            results.append(result)

        try:
            _run_units(jobs, mlm, str(tokenizer), processes, threads, progress, record)
        except SourceError:
            destination.clear()  # a damaged input must change before a rerun, which then starts over anyway
            raise

        total = Tally()
        for result in sorted(results, key=lambda result: result.name):  # corpus order: the first bad record first
            total.add(result.tally)
        problem = _corpus_problem(total, max_bad_fraction, text_field, inputs)
        if problem is not None:
            destination.clear()
            raise ConversionError(problem)
        destination.write(INDEX, _root_index(results))
    return ConversionSummary(
        output,
        total,
        len(units),
        len(finished),
        sum(result.tally.tokens for result in results if result.name not in finished),
        time.perf_counter() - started,
    )


def part_folder(index: int, parts: int) -> str:
    """Where part ``index`` of ``parts`` is written, under the dataset's output."""
    return f"part-{index:05d}-of-{parts:05d}"


def _join(output: str, name: str) -> str:
    return f"{output.rstrip('/')}/{name}" if _is_remote(output) else os.path.join(output, name)


def merge_parts(output: str | os.PathLike, parts: int, overwrite: bool = False) -> int:
    """Join the ``parts`` that ``convert_to_mds(part=(i, parts))`` wrote under ``output`` into one
    dataset: ``output/index.json`` lists every part's shards, in part order, so in corpus order. The
    index is merged by mosaicml-streaming's own ``merge_index``. Every part must be complete. Returns
    the number of shards."""
    from streaming.base.util import merge_index

    output = str(output) if _is_remote(str(output)) else os.path.abspath(output)
    destination = _open_output(output)
    if parts < 1:
        raise ConversionError(f"parts must be at least 1, got {parts}")
    if destination.exists(INDEX) and not overwrite:
        raise ConversionError(f"output {output} already holds a dataset ({INDEX}); pass --overwrite to merge again")
    missing = [
        part_folder(i, parts) for i in range(parts) if not destination.exists(f"{part_folder(i, parts)}/{INDEX}")
    ]
    if missing:
        raise ConversionError(
            f"cannot merge {output}: {len(missing)} of {parts} parts are not complete ({', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}); finish their conversions first"
        )
    indices = [_join(_join(output, part_folder(i, parts)), INDEX) for i in range(parts)]
    # For a local output keep_local must hold: streaming would otherwise delete the output folder.
    merge_index(indices, output, keep_local=not _is_remote(output))
    return len(json.loads(destination.read(INDEX))["shards"])


def _corpus_problem(total: Tally, max_bad_fraction: float, text_field: str, inputs: Sequence) -> str | None:
    bad = sum(total.bad.counts.values())
    if bad > max_bad_fraction * total.records:
        return (
            f"{bad:,} of {total.records:,} records are bad ({total.bad.describe()}; text field {text_field!r}), "
            f"more than --max-bad-fraction {max_bad_fraction}; fix the input or raise the limit"
        )
    if total.documents == 0:
        return f"empty corpus: no document with any text in {', '.join(map(str, inputs))}"
    return None
