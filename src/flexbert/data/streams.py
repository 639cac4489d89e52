"""Stream mixtures: the ``train_loader`` config and the streaming dataset of tokenized documents."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import gettempdir
from typing import Any, Literal

import numpy as np
import streaming.base.dataset
import torch.distributed as torch_dist
import zstandard
from streaming import Stream, StreamingDataset
from streaming.base.constant import LOCALS, SHM_TO_CLEAN
from streaming.base.shared import SharedMemory
from streaming.base.shared.prefix import _check_and_find_retrying, _check_self, _get_path, _pack_locals, _unpack_locals
from streaming.base.world import World

from flexbert.data.packing import MaskingConfig
from flexbert.data.shm import SHM_DIR
from flexbert.errors import FlexBertError
from flexbert.typed_config import ConfigError


class DataError(FlexBertError, ValueError):
    """The data itself is unusable: corrupt, or inconsistent with the model or tokenizer."""


@dataclass
class StreamConfig:
    """One source of MDS shards, as a mosaicml-streaming ``Stream``.

    Weighting: give every stream a ``proportion`` (relative share of each epoch), or give streams
    ``repeat`` (upsample factor) and/or ``choose`` (samples per epoch); unweighted streams count once.
    """

    remote: str | None = None  # s3://bucket/path, gs://..., or another local directory
    local: str | None = None  # where shards are cached (or read from, without remote)
    split: str | None = None
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None


DEFAULT_SHUFFLE_SEED = 9176


def derived_seed(run_name: str, purpose: str) -> int:
    """A seed of 31 bits that a run's name alone determines: a new run (a new phase) gets new ones,
    a resumed run (same name) the same ones."""
    digest = hashlib.sha256(f"{run_name}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


@dataclass
class LoaderConfig:
    # A stream set to null is left out: a recipe that includes another drops one of its streams so.
    streams: dict[str, StreamConfig | None]
    # Proportions from the streams' token counts: proportion_i ∝ tokens_i ** temperature (mmBERT
    # anneals it 0.7, 0.5, 0.3 over its phases; 1 keeps the natural mixture, lower flattens it). The
    # streams then give no proportion, repeat or choose.
    temperature: float | None = None
    # A tokenizer directory. Training fills it in where a recipe leaves it out: from the source of
    # init_from.hf, and the eval loader from the train loader.
    tokenizer: str | None = None
    max_seq_len: int = 1024  # tokens per packed row
    # Packed rows per batch of an evaluation loader (default: the run's device_microbatch_rows) or of
    # a loader used on its own. Training sizes its batches from global_batch_rows and
    # device_microbatch_rows, so a train_loader refuses it.
    rows_per_batch: int | None = None
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    lookahead: int = 256  # pending pieces the packer chooses from
    shuffle: bool = True
    # None: a training loader derives it from the run's name (see derived_seed), so each phase
    # draws a new order; any other loader uses DEFAULT_SHUFFLE_SEED.
    shuffle_seed: int | None = None
    shuffle_algo: Literal["naive", "py1b", "py1br", "py1e", "py1s", "py2s"] = "py1e"  # streaming's
    num_canonical_nodes: int | None = None
    sample_batch_size: int = 64  # documents per streaming fetch; must stay fixed across a resume
    num_workers: int = 0
    epoch_size: int | None = None  # samples per epoch; default: the mixture's natural size
    cache_limit: str | None = None
    download_retry: int = 2
    download_timeout: float = 60.0
    epochs: int | None = None  # None: cycle forever and let the trainer's duration decide

    def __post_init__(self) -> None:
        self.streams = {name: stream for name, stream in self.streams.items() if stream is not None}

    def with_seeds(self, shuffle_seed: int, mask_seed: int) -> LoaderConfig:
        """This config with the seeds it leaves unset set to these (the ones it gives stay)."""
        masking = self.masking if self.masking.seed is not None else dataclasses.replace(self.masking, seed=mask_seed)
        shuffle = self.shuffle_seed if self.shuffle_seed is not None else shuffle_seed
        return dataclasses.replace(self, shuffle_seed=shuffle, masking=masking)

    def validate(self, path: str = "train_loader") -> None:
        if not self.streams:
            raise ConfigError(f"{path}.streams", "no streams given; name at least one")
        for key in ("max_seq_len", "rows_per_batch", "lookahead", "sample_batch_size"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"{path}.{key}", f"must be positive, got {getattr(self, key)}")
        if self.max_seq_len < 3:
            raise ConfigError(f"{path}.max_seq_len", "must leave room for [CLS] token [SEP]")
        if self.num_workers < 0:
            raise ConfigError(f"{path}.num_workers", f"must be >= 0, got {self.num_workers}")
        if self.epoch_size is not None and self.epoch_size <= 0:
            raise ConfigError(f"{path}.epoch_size", f"must be positive, got {self.epoch_size}")
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError(f"{path}.temperature", f"must be > 0, got {self.temperature}")
        with_proportion = [name for name, s in self.streams.items() if s.proportion is not None]
        for name, stream in self.streams.items():
            stream_path = f"{path}.streams.{name}"
            weights = [k for k in ("proportion", "repeat", "choose") if getattr(stream, k) is not None]
            if self.temperature is not None and weights:
                raise ConfigError(
                    f"{stream_path}.{weights[0]}",
                    f"{path}.temperature sets every stream's proportion from its token count; remove this key",
                )
            if self.temperature is not None and stream.remote is not None:
                raise ConfigError(
                    f"{stream_path}.remote",
                    f"{path}.temperature counts each stream's tokens in its shards, which a remote stream has "
                    "only as training downloads them; name a local copy (local, without remote) or give proportions",
                )
            if len(weights) > 1:
                raise ConfigError(
                    f"{stream_path}", f"give one of proportion, repeat, choose; got {' and '.join(weights)}"
                )
            if weights and not getattr(stream, weights[0]) > 0:
                raise ConfigError(f"{stream_path}.{weights[0]}", f"must be > 0, got {getattr(stream, weights[0])}")
            if with_proportion and stream.proportion is None:
                raise ConfigError(
                    f"{stream_path}.proportion",
                    f"streams {', '.join(with_proportion)} set a proportion, so every stream must "
                    "(proportions cannot be mixed with repeat/choose or unweighted streams)",
                )
            if stream.remote is None and stream.local is None:
                raise ConfigError(stream_path, "needs a remote or a local location")
            if stream.remote is None:
                shards = _check_local_dataset(f"{stream_path}.local", Path(stream.local, stream.split or ""))
                if self.temperature is not None:
                    _check_token_layout(stream_path, shards)


def _check_local_dataset(key_path: str, folder: Path) -> list[dict]:
    """Refuse an MDS folder that cannot serve a whole epoch: no index, no samples, or a shard file
    missing or of another size than index.json records (a truncated copy, an interrupted write).
    Beyond the index, only stat calls; otherwise a shard is first read when the epoch reaches it,
    hours into a run. Returns the index's shard entries."""
    index = folder / "index.json"
    if not index.is_file():
        raise ConfigError(key_path, f"no MDS dataset at {folder} ({index} missing)")
    try:
        shards = json.loads(index.read_bytes())["shards"]
        samples = sum(shard["samples"] for shard in shards)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(key_path, f"{index} is not a readable MDS index ({type(err).__name__}: {err})") from None
    if samples == 0:
        raise ConfigError(key_path, f"the MDS dataset at {folder} holds no samples")
    for shard in shards:
        problem = _shard_file_problem(folder, shard)
        if problem is not None:
            raise ConfigError(key_path, f"{problem}; convert or copy the dataset again")
    return shards


def _shard_file_problem(folder: Path, shard: dict) -> str | None:
    # streaming reads the compressed file, or the decompressed copy it writes beside it on first use.
    files = [info for info in (shard.get("zip_data"), shard.get("raw_data")) if info]
    present = [info for info in files if (folder / info["basename"]).is_file()]
    if not present:
        return f"shard file {folder / files[0]['basename']} is missing"
    for info in present:
        size = (folder / info["basename"]).stat().st_size
        if size != info["bytes"]:
            return (
                f"shard file {folder / info['basename']} is truncated or corrupt: {size:,} bytes where "
                f"index.json records {info['bytes']:,}"
            )
    return None


# flexbert's MDS layout (data/convert.py): one column, input_ids, by encoding the bytes of a token.
TOKEN_WIDTHS = {"ndarray:uint16": 2, "ndarray:uint32": 4}
# A sample of that layout is its column's size (u32), one byte of ndim and shape width, its one
# dimension (the length) in the narrowest unsigned width that holds it, then the tokens. Per width:
# (its bytes, the lengths it is chosen for).
SHAPE_WIDTHS = ((1, range(1, 1 << 8)), (2, range(1 << 8, 1 << 16)), (4, range(1 << 16, 1 << 32)))


def _check_token_layout(key_path: str, shards: list[dict]) -> None:
    """Refuse a stream whose tokens :func:`stream_tokens` cannot count: another column layout, or a
    compression it cannot read the start of."""
    for shard in shards:
        columns = dict(zip(shard.get("column_names") or [], shard.get("column_encodings") or []))
        if shard.get("format") != "mds" or list(columns) != ["input_ids"] or columns["input_ids"] not in TOKEN_WIDTHS:
            raise ConfigError(
                key_path,
                "temperature weighs streams by their tokens, which it counts in MDS shards of one column "
                f"input_ids (ndarray:uint16 or ndarray:uint32), as flexbert prepare mds writes; shard "
                f"{(shard.get('raw_data') or {}).get('basename')} holds {columns or 'no columns'}",
            )
        compression = shard.get("compression")
        if compression is not None and compression.split(":")[0] != "zstd":
            raise ConfigError(
                key_path,
                f"temperature counts tokens in uncompressed or zstd shards; shard {shard['zip_data']['basename']} "
                f"is compressed with {compression}",
            )


def stream_tokens(key_path: str, folder: Path) -> int:
    """The tokens of a local MDS stream of flexbert's layout, exactly.

    index.json records each shard's samples and bytes, but bytes alone leave the count uncertain by up
    to a token per sample, since the width of a sample's stored length grows with the length (see
    SHAPE_WIDTHS). Each shard opens with its sample count and the offsets of its samples, so this reads
    that table alone (decompressing only the start of a zstd shard), and each sample's size gives its
    length: the widths' byte counts differ modulo the token width, or their length ranges part them,
    so exactly one width fits each size."""
    total = 0
    for shard in json.loads((folder / "index.json").read_bytes())["shards"]:
        file, head = _shard_head(folder, shard, 4 * (shard["samples"] + 2))
        table = np.frombuffer(head[: len(head) // 4 * 4], "<u4").astype(np.int64)
        if len(table) != shard["samples"] + 2 or table[0] != shard["samples"]:
            raise DataError(
                f"{key_path}: shard {file} does not open with the table of its {shard['samples']} samples "
                "that index.json records; convert or copy the dataset again"
            )
        width = TOKEN_WIDTHS[shard["column_encodings"][0]]
        body = np.diff(table[1:]) - 5  # less the column's size and the byte of ndim and shape width
        lengths = np.zeros_like(body)
        fitted = np.zeros(len(body), bool)
        for shape_bytes, chosen_for in SHAPE_WIDTHS:
            length, rest = np.divmod(body - shape_bytes, width)
            fits = (rest == 0) & (length >= chosen_for.start) & (length < chosen_for.stop)
            lengths[fits] = length[fits]
            fitted |= fits
        if not fitted.all():
            raise DataError(
                f"{key_path}: shard {file} holds a sample of {body[~fitted][0] + 5} bytes, which is no "
                "array of tokens; convert or copy the dataset again"
            )
        total += int(lengths.sum())
    return total


def _shard_head(folder: Path, shard: dict, size: int) -> tuple[Path, bytes]:
    """The shard's file, and its first ``size`` bytes uncompressed (fewer if it is shorter)."""
    raw = folder / shard["raw_data"]["basename"]
    if raw.is_file():  # uncompressed, or decompressed beside the zstd file by an earlier run
        with raw.open("rb") as file:
            return raw, file.read(size)
    zipped = folder / shard["zip_data"]["basename"]
    chunks = []
    with zipped.open("rb") as file, zstandard.ZstdDecompressor().stream_reader(file) as reader:
        while size > 0 and (chunk := reader.read(size)):
            chunks.append(chunk)
            size -= len(chunk)
    return zipped, b"".join(chunks)


@dataclass(frozen=True)
class TemperatureMixture:
    """Streams weighed by their tokens: proportion_i ∝ tokens_i ** temperature."""

    temperature: float
    tokens: dict[str, int]

    @property
    def proportions(self) -> dict[str, float]:
        weights = {name: count**self.temperature for name, count in self.tokens.items()}
        total = sum(weights.values())
        return {name: weight / total for name, weight in weights.items()}

    def table(self, path: str) -> str:
        """The mixture as a few readable lines: each stream's tokens, natural share and proportion."""
        natural, proportions = sum(self.tokens.values()), self.proportions
        rows = [("stream", "tokens", "natural", "proportion")] + [
            (name, f"{count:,}", f"{count / natural:.1%}", f"{proportions[name]:.1%}")
            for name, count in self.tokens.items()
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [
            "  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows
        ]
        return "\n".join([f"{path}: stream proportions proportional to tokens^{self.temperature}", *lines])


class NamedStream(Stream):
    """A Stream that knows its config key, so that its failures name it: streaming's own errors name
    an endpoint URL or a cache file, and some say nothing at all."""

    def __init__(self, key_path: str, **kwargs):
        super().__init__(**kwargs)
        self.key_path = key_path

    def get_shards(self, world: World, allow_unsafe_types: bool) -> list:
        index = os.path.join(self.remote or self.local, self.split, "index.json")
        try:
            shards = super().get_shards(world, allow_unsafe_types)
        except Exception as err:  # downloads fail in as many ways as there are storage backends
            retries = self.download_retry
            attempts = f" after {retries} attempt{'s' if retries != 1 else ''}" if self.remote else ""
            raise ConfigError(
                f"{self.key_path}.{'remote' if self.remote else 'local'}",
                f"cannot read {index}{attempts} ({type(err).__name__}: {err})",
            ) from None
        if sum(shard.samples for shard in shards) == 0:
            raise ConfigError(self.key_path, f"{index} lists no samples")
        return shards


class DocumentDataset(StreamingDataset):
    """A streaming mixture of tokenized documents; each sample says which (stream, sample) it is.

    A shard that cannot be read raises a DataError naming its file. streaming prepares shards in
    background threads whose failure ends the epoch early, with only a logged traceback: training
    would silently go on with part of the data. Here the epoch raises that failure instead.
    """

    background_error: Exception | None = None
    mixture: TemperatureMixture | None = None  # where train_loader.temperature set the proportions

    def __iter__(self):
        self.background_error = None
        yield from super().__iter__()
        if self.background_error is not None:
            raise self.background_error

    def on_exception(self, future: Future) -> None:
        error = future.exception()
        if error is not None:
            self.background_error = error
            self._event.set()  # as streaming does, which then re-raises where nothing but a logger sees it

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as err:
            stream = self.streams[self.stream_per_shard[shard_id]]
            files = [
                os.path.join(stream.local, stream.split, (zipped or raw).basename)
                for raw, zipped in self.shards[shard_id].file_pairs
            ]
            raise DataError(
                f"{stream.key_path}: shard {', '.join(files)} is corrupt or unreadable "
                f"({type(err).__name__}: {err}); convert or copy the dataset again"
            ) from err

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        if self.background_error is not None:  # streaming would raise "Background thread failed" instead
            raise self.background_error
        sample = super().get_item(sample_id, retry)
        shard_id, _ = self.spanner[sample_id]
        return {
            "input_ids": np.asarray(sample["input_ids"]),
            "stream": int(self.stream_per_shard[shard_id]),
            "sample": int(sample_id),
        }


@contextmanager
def _machine_lock() -> Iterator[None]:
    """Held by one process at a time among those that share this machine's shared memory: a lock of
    its folder (of the temporary folder where there is none, as on macOS)."""
    folder = SHM_DIR if SHM_DIR.is_dir() else Path(gettempdir())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # and with it the lock


def _claim_shm_prefix(streams_local: list[str], streams_remote: list, world: World, retry: int = 100):
    """streaming's ``get_shm_prefix``, with the prefix probed and created in one step.

    streaming's local leaders probe for a free prefix, wait at a barrier of the whole world, then
    create it, without a lock. Leaders that share /dev/shm (the launchers of several nodes on one
    machine, two runs starting together) probe alike and all but one creation fail; a retry would
    then pass the barriers on that rank alone, out of step with every other rank, and the run would
    hang. Here each leader probes and creates under a lock of the machine's shared memory, and the
    other ranks learn their node's prefix through one all-gather."""
    _check_self(streams_local)
    prefix_int, shm = None, None
    if world.is_local_leader:
        with _machine_lock():
            while shm is None:
                prefix_int = max(
                    _check_and_find_retrying(streams_local, streams_remote, name, retry) for name in SHM_TO_CLEAN
                )
                data = _pack_locals(streams_local, prefix_int)
                try:
                    shm = SharedMemory(_get_path(prefix_int, LOCALS), True, len(data))
                except FileExistsError:  # created by a process that takes no lock (not flexbert's): probe on
                    continue
                shm.buf[: len(data)] = data
    if torch_dist.is_available() and torch_dist.is_initialized():
        choices = [None] * torch_dist.get_world_size()
        torch_dist.all_gather_object(choices, (world.node, prefix_int))
        prefix_int = next(prefix for node, prefix in choices if node == world.node and prefix is not None)
    if not world.is_local_leader:
        shm = SharedMemory(_get_path(prefix_int, LOCALS), False)
        their_locals, their_prefix_int = _unpack_locals(bytes(shm.buf))
        if their_locals != streams_local or their_prefix_int != prefix_int:
            raise RuntimeError(
                f"streaming's shared memory {_get_path(prefix_int, LOCALS)} holds {their_locals} (prefix "
                f"{their_prefix_int}), not this rank's {streams_local}: do all ranks of a node give the same "
                "local folders?"
            )
    return prefix_int, shm


def build_dataset(config: LoaderConfig, path: str = "train_loader") -> DocumentDataset:
    original = streaming.base.dataset.get_shm_prefix
    streaming.base.dataset.get_shm_prefix = _claim_shm_prefix  # what StreamingDataset.__init__ calls
    try:
        return _streaming_dataset(config, path)
    finally:
        streaming.base.dataset.get_shm_prefix = original


def _streaming_dataset(config: LoaderConfig, path: str) -> DocumentDataset:
    mixture = None
    if config.temperature is not None:
        tokens = {
            name: stream_tokens(f"{path}.streams.{name}", Path(s.local, s.split or ""))
            for name, s in config.streams.items()
        }
        mixture = TemperatureMixture(config.temperature, tokens)
    streams = [
        NamedStream(
            f"{path}.streams.{name}",
            remote=s.remote,
            local=s.local,
            split=s.split,
            # As if the recipe gave them, so the shuffle, resumption and the data order go as with any.
            proportion=mixture.proportions[name] if mixture is not None else s.proportion,
            repeat=s.repeat,
            choose=s.choose,
            download_retry=config.download_retry,
            download_timeout=config.download_timeout,
        )
        for name, s in config.streams.items()
    ]
    dataset = DocumentDataset(
        streams=streams,
        batch_size=config.sample_batch_size,
        shuffle=config.shuffle,
        shuffle_seed=config.shuffle_seed,
        shuffle_algo=config.shuffle_algo,
        # Fixed up front (streaming otherwise decides lazily, inside workers), so the shuffle, and
        # with it exact resumption, is pinned down by the config and the node count alone.
        num_canonical_nodes=config.num_canonical_nodes or World.detect().num_nodes,
        epoch_size=config.epoch_size,
        cache_limit=config.cache_limit,
        download_retry=config.download_retry,
        download_timeout=config.download_timeout,
    )
    dataset.mixture = mixture
    return dataset
