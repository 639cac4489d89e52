"""Masking and sequence packing: documents into rows of a fixed token budget, then into unpadded
batches of masked tokens.

Masking is BERT's corruption, reproducible per sample: its random draws are seeded by the piece's
identity, never by worker count, batch order or resumption.

Every piece in a row is framed ``[CLS] tokens [SEP]``. A document longer than a row is split into
row-sized chunks (never truncated). Each row starts with the oldest pending piece, so none waits
forever, and is then filled best-fit from a look-ahead buffer: the longest piece that still fits
goes in next, which keeps padding well under 1% on real corpora.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from flexbert.core.model.losses import IGNORE_INDEX
from flexbert.typed_config import ConfigError

DEFAULT_MASK_SEED = 0


def _check_rate(path: str, rate: float) -> None:
    if not 0.0 < rate < 1.0:
        raise ConfigError(path, f"must be in (0, 1), got {rate}")


# The keys each shape of schedule takes; every other key of the section is refused.
SCHEDULE_KEYS = {
    "constant": ("value",),
    "linear": ("start", "end"),
    "cosine": ("start", "end"),
    "steps": ("values", "at"),
}


@dataclass(frozen=True)
class MaskRateSchedule:
    """The mask rate over a training phase, as a function of its progress in [0, 1] (mmBERT lowers
    it from phase to phase; a schedule also moves it within one). ``constant``: ``value``;
    ``linear`` and ``cosine``: from ``start`` to ``end``; ``steps``: ``values[i]`` from the fraction
    ``at[i - 1]`` of the phase on (``at`` has one fraction fewer than ``values``)."""

    shape: Literal["constant", "linear", "cosine", "steps"]
    value: float | None = None
    start: float | None = None
    end: float | None = None
    values: list[float] | None = None
    at: list[float] | None = None

    def validate(self, path: str) -> None:
        wanted = SCHEDULE_KEYS[self.shape]
        for key in ("value", "start", "end", "values", "at"):
            given = getattr(self, key) is not None
            if given and key not in wanted:
                raise ConfigError(
                    f"{path}.{key}", f"a {self.shape} schedule does not take {key}; it takes {' and '.join(wanted)}"
                )
            if not given and key in wanted:
                raise ConfigError(f"{path}.{key}", f"missing: a {self.shape} schedule takes {' and '.join(wanted)}")
        if self.shape != "steps":
            for key in wanted:
                _check_rate(f"{path}.{key}", getattr(self, key))
            return
        for i, rate in enumerate(self.values):
            _check_rate(f"{path}.values[{i}]", rate)
        if len(self.at) != len(self.values) - 1:
            raise ConfigError(
                f"{path}.at",
                f"gives {len(self.at)} fractions for {len(self.values)} values; each value after the first "
                "starts at one fraction of the phase, so give one fewer",
            )
        bounds = [0.0, *self.at, 1.0]
        if any(not earlier < later for earlier, later in zip(bounds, bounds[1:])):
            raise ConfigError(f"{path}.at", f"must increase strictly within (0, 1), got {self.at}")

    def rate_at(self, progress: float) -> float:
        if self.shape == "constant":
            return self.value
        if self.shape == "steps":
            return self.values[bisect.bisect_right(self.at, progress)]
        if self.shape == "linear":
            remaining = 1.0 - progress
        else:
            remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.end + (self.start - self.end) * remaining


@dataclass(frozen=True)
class MaskingConfig:
    # ModernBERT pretrains at 30% (and evaluates at 15%); a schedule moves the rate over a training
    # phase, which the training loader measures in rows of max_seq_len tokens (see PackedMLMLoader).
    mlm_probability: float | MaskRateSchedule = 0.30
    mask_fraction: float = 0.8  # of selected tokens, replaced by [MASK]
    random_fraction: float = 0.1  # replaced by a random regular token; the rest stay unchanged
    seed: int | None = None  # None: as LoaderConfig.shuffle_seed (derived per run when training)

    @property
    def scheduled(self) -> bool:
        return isinstance(self.mlm_probability, MaskRateSchedule)

    def rate_at(self, progress: float) -> float:
        """The mask rate at ``progress`` (0 to 1) through the phase."""
        return self.mlm_probability.rate_at(progress) if self.scheduled else self.mlm_probability

    def validate(self, path: str = "masking") -> None:
        if not self.scheduled:  # a schedule has checked itself
            _check_rate(f"{path}.mlm_probability", self.mlm_probability)
        if self.mask_fraction < 0 or self.random_fraction < 0 or self.mask_fraction + self.random_fraction > 1:
            raise ConfigError(
                f"{path}.mask_fraction",
                f"mask_fraction={self.mask_fraction} and random_fraction={self.random_fraction} must be "
                "non-negative and sum to at most 1",
            )
        if self.seed is not None and self.seed < 0:
            raise ConfigError(f"{path}.seed", f"must be non-negative, got {self.seed}")


class Masker:
    """Selects each non-special token with probability p; of those, 80% -> [MASK], 10% -> random,
    10% kept. The random draws are seeded by (seed, identity), so a sample's masking depends only on
    which sample it is, not on worker count, batch order or resumption. A token is selected where its
    draw falls below p, so with the same draws a lower rate selects a subset of a higher one's."""

    def __init__(self, config: MaskingConfig, mask_id: int, special: np.ndarray):
        self.config = config
        self.mask_id = mask_id
        self.special = special  # bool [vocab_size]
        self.regular_ids = np.flatnonzero(~special)
        self.rate = config.rate_at(0.0)  # p; a loader under a schedule masks each batch at_rate(...)

    def at_rate(self, rate: float) -> Masker:
        """This masker, selecting with probability ``rate``."""
        masker = copy.copy(self)
        masker.rate = rate
        return masker

    def __call__(self, tokens: np.ndarray, identity: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """tokens: int64 [n] -> (corrupted input ids [n], labels [n] with -100 where not selected)."""
        seed = self.config.seed if self.config.seed is not None else DEFAULT_MASK_SEED
        rng = np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence([seed, *identity])))
        selected = (rng.random(tokens.shape[0]) < self.rate) & ~self.special[tokens]
        labels = np.where(selected, tokens, IGNORE_INDEX)
        action = rng.random(tokens.shape[0])
        to_mask = selected & (action < self.config.mask_fraction)
        to_random = (
            selected
            & (action >= self.config.mask_fraction)
            & (action < self.config.mask_fraction + self.config.random_fraction)
        )
        corrupted = tokens.copy()
        corrupted[to_mask] = self.mask_id
        corrupted[to_random] = rng.choice(self.regular_ids, size=int(to_random.sum()))
        return corrupted, labels


def next_token_labels(tokens: np.ndarray, identity: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The causal objective's labels, in a masker's place: tokens int64 [n] -> (the tokens unchanged,
    labels [n] where position i is labelled with token i + 1, and the last with nothing). Each piece
    is framed ``[CLS] … [SEP]``, so a piece's [CLS] predicts its first token and its last token
    predicts [SEP], the end of the text; no label crosses into the next piece of the row."""
    labels = np.full_like(tokens, IGNORE_INDEX)
    labels[:-1] = tokens[1:]
    return tokens, labels


@dataclass(frozen=True)
class Piece:
    """Tokens [start, end) of one document, identified by (stream, sample) in its dataset, as read
    in ``epoch`` (which seeds its masks: each epoch masks a document afresh)."""

    stream: int
    sample: int
    start: int
    end: int
    tokens: np.ndarray  # the piece's tokens (not the whole document)
    epoch: int = 0

    @property
    def framed_length(self) -> int:
        return self.end - self.start + 2  # [CLS] + tokens + [SEP]

    def key(self) -> tuple[int, int, int, int]:
        return (self.stream, self.sample, self.start, self.end)


def split_document(stream: int, sample: int, tokens: np.ndarray, row_tokens: int, epoch: int = 0) -> list[Piece]:
    """Chunks of at most ``row_tokens - 2`` tokens, so each framed chunk fits one row."""
    chunk = row_tokens - 2
    return [
        Piece(stream, sample, start, min(start + chunk, len(tokens)), tokens[start : start + chunk], epoch)
        for start in range(0, len(tokens), chunk)
    ]


class GreedyPacker:
    """Holds pending pieces in arrival order and fills rows best-fit from them."""

    def __init__(self, row_tokens: int, lookahead: int):
        if row_tokens < 3:
            raise ValueError(f"row_tokens must be at least 3 ([CLS] token [SEP]), got {row_tokens}")
        self.row_tokens = row_tokens
        self.lookahead = lookahead
        self.pending: list[Piece] = []

    def add(self, pieces: Iterable[Piece]) -> None:
        self.pending.extend(pieces)

    def has_full_lookahead(self) -> bool:
        return len(self.pending) >= self.lookahead

    def pop_row(self) -> list[Piece]:
        """One row's pieces; empty only when nothing is pending."""
        if not self.pending:
            return []
        row = [self.pending.pop(0)]
        room = self.row_tokens - row[0].framed_length
        while self.pending:
            fitting = [i for i, p in enumerate(self.pending) if p.framed_length <= room]
            if not fitting:
                break
            best = max(fitting, key=lambda i: (self.pending[i].framed_length, -i))
            piece = self.pending.pop(best)
            row.append(piece)
            room -= piece.framed_length
        return row


@dataclass
class PackedBatch:
    """What the unpadded encoder needs, and where its rows, pieces and labelled tokens lie.

    Composer moves a batch's tensors to the device before anything splits or counts it, and leaves
    everything else on the host. So the tensors are what the model reads, and what the microbatch
    split, the token counts and the logs need is kept beside them as NumPy arrays and ints: nothing
    on the training path has to read a device value, and nothing is copied to the device unused.
    """

    # Device side.
    input_ids: torch.Tensor  # [T] int64
    labels: torch.Tensor  # [T] int64, -100 where not predicted
    cu_seqlens: torch.Tensor  # [pieces + 1] int32, for the attention kernels
    # [N] int64 positions of the labelled tokens, found here on the host so that neither the
    # sparse head nor the token count needs a device sync for them.
    masked_index: torch.Tensor
    # Host side.
    max_seqlen: int
    num_rows: int
    row_tokens: int
    host_cu_seqlens: np.ndarray  # [pieces + 1] int64, cu_seqlens as the host knows it
    row_pieces: np.ndarray  # [rows + 1] int64: row r holds pieces [row_pieces[r], row_pieces[r+1])
    row_masked: np.ndarray  # [rows + 1] int64: row r's labelled tokens are masked_index[row_masked[r]:row_masked[r+1]]
    piece_keys: np.ndarray  # [pieces, 4] int64: stream, sample, start, end

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_masked(self) -> int:
        return self.masked_index.shape[0]

    @property
    def packing_efficiency(self) -> float:
        return self.num_tokens / (self.num_rows * self.row_tokens)

    def select_rows(self, first: int, end: int) -> PackedBatch:
        """Rows [first, end) as a self-contained batch: device tensors are sliced at offsets read
        from the host arrays, never from the tensors themselves."""
        first_piece, end_piece = int(self.row_pieces[first]), int(self.row_pieces[end])
        start, stop = int(self.host_cu_seqlens[first_piece]), int(self.host_cu_seqlens[end_piece])
        first_masked, end_masked = int(self.row_masked[first]), int(self.row_masked[end])
        host_cu_seqlens = self.host_cu_seqlens[first_piece : end_piece + 1] - start
        return PackedBatch(
            input_ids=self.input_ids[start:stop],
            labels=self.labels[start:stop],
            cu_seqlens=self.cu_seqlens[first_piece : end_piece + 1] - start,
            masked_index=self.masked_index[first_masked:end_masked] - start,
            max_seqlen=int(np.diff(host_cu_seqlens).max()),
            num_rows=end - first,
            row_tokens=self.row_tokens,
            host_cu_seqlens=host_cu_seqlens,
            row_pieces=self.row_pieces[first : end + 1] - first_piece,
            row_masked=self.row_masked[first : end + 1] - first_masked,
            piece_keys=self.piece_keys[first_piece:end_piece],
        )

    def as_dict(self) -> dict:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


def collate_rows(rows: Sequence[Sequence[Piece]], row_tokens: int, cls_id: int, sep_id: int, masker) -> PackedBatch:
    """Frame, mask and concatenate the pieces of ``rows`` into one unpadded batch."""
    pieces = [piece for row in rows for piece in row]
    inputs, labels, lengths = [], [], []
    for piece in pieces:
        framed = np.concatenate(([cls_id], piece.tokens.astype(np.int64), [sep_id]))
        corrupted, piece_labels = masker(framed, (piece.epoch, piece.stream, piece.sample, piece.start))
        inputs.append(corrupted)
        labels.append(piece_labels)
        lengths.append(len(framed))
    host_cu_seqlens = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    all_labels = np.concatenate(labels)
    masked_index = np.flatnonzero(all_labels != IGNORE_INDEX)
    row_pieces = np.concatenate(([0], np.cumsum([len(row) for row in rows]))).astype(np.int64)
    return PackedBatch(
        input_ids=torch.from_numpy(np.concatenate(inputs)),
        labels=torch.from_numpy(all_labels),
        cu_seqlens=torch.from_numpy(host_cu_seqlens.astype(np.int32)),
        masked_index=torch.from_numpy(masked_index),
        max_seqlen=max(lengths),
        num_rows=len(rows),
        row_tokens=row_tokens,
        host_cu_seqlens=host_cu_seqlens,
        row_pieces=row_pieces,
        row_masked=np.searchsorted(masked_index, host_cu_seqlens[row_pieces]).astype(np.int64),
        piece_keys=np.array([piece.key() for piece in pieces], dtype=np.int64).reshape(-1, 4),
    )
