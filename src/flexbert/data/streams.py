"""Stream mixtures: the ``train_loader`` config and the streaming dataset of tokenized documents."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from streaming import Stream, StreamingDataset
from streaming.base.world import World

from flexbert.data.masking import MaskingConfig
from flexbert.typed_config import ConfigError


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


@dataclass
class LoaderConfig:
    tokenizer: str
    streams: dict[str, StreamConfig]
    max_seq_len: int = 1024  # tokens per packed row
    rows_per_batch: int = 8  # packed rows in one device microbatch
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    lookahead: int = 256  # pending pieces the packer chooses from
    shuffle: bool = True
    shuffle_seed: int = 9176
    shuffle_algo: str = "py1e"
    num_canonical_nodes: int | None = None
    sample_batch_size: int = 64  # documents per streaming fetch; must stay fixed across a resume
    num_workers: int = 0
    epoch_size: int | None = None  # samples per epoch; default: the mixture's natural size
    cache_limit: str | None = None
    download_retry: int = 2
    download_timeout: float = 60.0
    epochs: int | None = None  # None: cycle forever and let the trainer's duration decide

    def validate(self, path: str = "train_loader") -> None:
        if not self.streams:
            raise ConfigError(f"{path}.streams", "no streams given; name at least one")
        for key in ("max_seq_len", "rows_per_batch", "lookahead", "sample_batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{path}.{key}", f"must be positive, got {getattr(self, key)}")
        if self.max_seq_len < 3:
            raise ConfigError(f"{path}.max_seq_len", "must leave room for [CLS] token [SEP]")
        if self.num_workers < 0:
            raise ConfigError(f"{path}.num_workers", f"must be >= 0, got {self.num_workers}")
        self.masking.validate(f"{path}.masking")
        with_proportion = [name for name, s in self.streams.items() if s.proportion is not None]
        for name, stream in self.streams.items():
            stream_path = f"{path}.streams.{name}"
            weights = [k for k in ("proportion", "repeat", "choose") if getattr(stream, k) is not None]
            if len(weights) > 1:
                raise ConfigError(f"{stream_path}", f"give one of proportion, repeat, choose; got {' and '.join(weights)}")
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
                index = Path(stream.local, stream.split or "", "index.json")
                if not index.is_file():
                    raise ConfigError(f"{stream_path}.local", f"no MDS dataset at {stream.local} ({index} missing)")


class DocumentDataset(StreamingDataset):
    """A streaming mixture of tokenized documents; each sample says which (stream, sample) it is."""

    def get_item(self, sample_id: int, retry: int = 7) -> dict[str, Any]:
        sample = super().get_item(sample_id, retry)
        shard_id, _ = self.spanner[sample_id]
        return {
            "input_ids": np.asarray(sample["input_ids"]),
            "stream": int(self.stream_per_shard[shard_id]),
            "sample": int(sample_id),
        }


def build_dataset(config: LoaderConfig, attempts: int = 5) -> DocumentDataset:
    # streaming picks its shared-memory prefix by probing names and then creating one, without a
    # lock: a process (or a dying one's resource tracker) acting on the same name in between makes
    # the creation fail. A fresh probe then finds a free name.
    for attempt in range(attempts - 1):
        try:
            return _streaming_dataset(config)
        except FileExistsError:
            time.sleep(0.2 * (attempt + 1))
    return _streaming_dataset(config)


def _streaming_dataset(config: LoaderConfig) -> DocumentDataset:
    streams = [
        Stream(remote=s.remote, local=s.local, split=s.split, proportion=s.proportion, repeat=s.repeat,
               choose=s.choose, download_retry=config.download_retry, download_timeout=config.download_timeout)
        for s in config.streams.values()
    ]
    return DocumentDataset(
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
