"""The packed MLM loader: streamed documents -> packed, masked, unpadded batches, resumable exactly.

Resumption without replay. The loader's state is, per rank, the epoch, how many documents of its
partition it has consumed, and the keys of the pieces still pending in the packer. On resume,
streaming restarts the epoch at the largest whole-batch offset that every rank has passed, each
rank skips its few remaining consumed documents, and pending pieces are re-read by sample id. The
result is the exact row sequence an uninterrupted run would produce.

Ranks in step. The packer carries pieces over from one epoch into the next, so every batch has the
rows the batch-size schedule asks for, on every rank. Streaming opens each epoch with a barrier
across a node's ranks, and ranks use up their equal shares of documents at different batches, so
under several processes the ranks agree, before handing out each batch, whether one of them has run
out: if so, all read the rest of their share into the packer and open the next epoch together.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from flexbert.core.tokenizer import MLMTokenizer
from flexbert.data.packing import (
    DEFAULT_MASK_SEED,
    GreedyPacker,
    Masker,
    PackedBatch,
    Piece,
    collate_rows,
    split_document,
)
from flexbert.data.shm import clean_stale_streaming_memory
from flexbert.data.streams import DEFAULT_SHUFFLE_SEED, DataError, DocumentDataset, LoaderConfig, build_dataset
from flexbert.typed_config import ConfigError


@dataclass
class RankState:
    epoch: int = 0  # the streaming epoch documents are being read from
    consumed: int = 0  # documents of this epoch's partition pulled into the packer
    # (epoch read in, stream, sample, start, end) of the pieces still unpacked, which may include
    # the last pieces of the previous epoch
    pending: tuple[tuple[int, int, int, int, int], ...] = ()
    rows_emitted: int = 0  # over the whole run, for the batch-size schedule


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _clean_stale_memory_once_per_node() -> None:
    """Local rank 0 cleans while the node's other ranks wait: a rank cleaning while another creates
    its segments could take a segment that exists but is not mapped yet for a stale one."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        clean_stale_streaming_memory()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _identity(samples: list) -> list:
    return samples


class PackedMLMLoader:
    """Iterates this rank's packed MLM batches; ``state_dict``/``load_state_dict`` resume exactly."""

    def __init__(
        self,
        config: LoaderConfig,
        tokenizer: MLMTokenizer,
        model_vocab_size: int | None = None,
        path: str = "train_loader",
        batch_rows: int | Callable[[int], int] | None = None,
    ):
        """``batch_rows`` is this rank's rows per batch, or a function of the global rows emitted so
        far that gives them (batch-size warmup); by default ``config.rows_per_batch``."""
        config = config.with_seeds(DEFAULT_SHUFFLE_SEED, DEFAULT_MASK_SEED)
        batch_rows = batch_rows or config.rows_per_batch
        if batch_rows is None:
            raise ConfigError(f"{path}.rows_per_batch", "missing: how many packed rows go into one batch")
        if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
            raise DataError(
                f"{path}.tokenizer: {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's "
                f"vocab_size is {model_vocab_size}"
            )
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_limit = model_vocab_size or tokenizer.vocab_size
        _clean_stale_memory_once_per_node()
        self.dataset: DocumentDataset = build_dataset(config, path)
        self.masker = Masker(config.masking, tokenizer.mask_id, tokenizer.special_mask())
        self.batch_rows = batch_rows if callable(batch_rows) else (lambda rows_so_far: batch_rows)
        self.path = path
        # The ranks' agreement before each batch is a host matter: under NCCL it goes over a gloo
        # group of its own, so that it never touches (or waits for) the GPU.
        self._host_group = None
        if dist.is_available() and dist.is_initialized() and dist.get_backend() != "gloo":
            self._host_group = dist.new_group(backend="gloo")
        self.state = RankState()  # as of the last batch handed out
        self._resume: RankState | None = None
        self.real_tokens = 0
        self.capacity_tokens = 0

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / row capacity over every batch handed out so far."""
        return self.real_tokens / self.capacity_tokens if self.capacity_tokens else 0.0

    # --- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Every rank's state (gathered: call on all ranks together)."""
        _, world = _world()
        states = [None] * world
        if world > 1:
            dist.all_gather_object(states, self.state, group=self._host_group)
        else:
            states = [self.state]
        return {
            "world_size": world,
            "sample_batch_size": self.config.sample_batch_size,
            "ranks": [vars(s) | {"pending": [list(k) for k in s.pending]} for s in states],
        }

    def load_state_dict(self, state: dict) -> None:
        rank, world = _world()
        if state["world_size"] != world or state["sample_batch_size"] != self.config.sample_batch_size:
            raise DataError(
                f"loader state was saved with world_size={state['world_size']}, sample_batch_size="
                f"{state['sample_batch_size']}; this run has {world} and {self.config.sample_batch_size}. "
                "Exact resumption needs both unchanged."
            )
        # Pending keys saved before pieces carried their epoch are of the state's own epoch.
        ranks = [
            RankState(
                r["epoch"],
                r["consumed"],
                tuple(tuple(k) if len(k) == 5 else (r["epoch"], *k) for k in r["pending"]),
                r["rows_emitted"],
            )
            for r in state["ranks"]
        ]
        self._resume = ranks[rank]
        self.state = ranks[rank]
        batch = self.config.sample_batch_size
        whole_batches = min(r.consumed for r in ranks if r.epoch == self._resume.epoch) // batch
        self._resume_offset = whole_batches * batch  # per rank; streaming counts all ranks together
        self.dataset.load_state_dict(
            {
                "epoch": self._resume.epoch,
                "sample_in_epoch": self._resume_offset * world,
                "num_canonical_nodes": self.dataset.num_canonical_nodes,
                "shuffle_seed": self.config.shuffle_seed,
                "initial_physical_nodes": None,
            }
        )

    # --- iteration -------------------------------------------------------------------------------

    def _documents(self) -> Iterator[dict]:
        """This rank's documents of streaming's next epoch, from where the resume state says. The
        first is fetched at once: streaming opens an epoch with a barrier across the node's ranks,
        which every rank must reach now, not when it next needs a document."""
        loader = DataLoader(
            self.dataset,
            batch_size=self.config.sample_batch_size,
            num_workers=self.config.num_workers,
            collate_fn=_identity,
        )
        documents = (sample for batch in loader for sample in batch)
        if self._resume is not None:
            for _ in range(self._resume.consumed - self._resume_offset):
                next(documents)
            self._resume = None
        first = next(documents, None)
        return documents if first is None else itertools.chain([first], documents)

    def _pieces(self, document: dict, epoch: int) -> list[Piece]:
        tokens = document["input_ids"]
        if tokens.size and int(tokens.max()) >= self.vocab_limit:
            raise DataError(
                f"stream {list(self.config.streams)[document['stream']]!r} sample {document['sample']}: "
                f"token id {int(tokens.max())} is outside the model's vocabulary ({self.vocab_limit})"
            )
        return split_document(document["stream"], document["sample"], tokens, self.config.max_seq_len, epoch)

    def _restore_pending(self, keys) -> list[Piece]:
        pieces = []
        for epoch, stream, sample, start, end in keys:
            tokens = self.dataset[sample]["input_ids"]
            pieces.append(Piece(stream, sample, start, end, tokens[start:end], epoch))
        return pieces

    def __iter__(self) -> Iterator[PackedBatch]:
        """Batches of ``batch_rows(...)`` rows on every rank. A loader with a finite number of
        ``epochs`` ends with a short batch, and all its ranks end at the same batch."""
        config = self.config
        _, world = _world()
        epoch, consumed = self.state.epoch, self.state.consumed
        if config.epochs is not None and epoch >= config.epochs:
            return
        packer = GreedyPacker(config.max_seq_len, config.lookahead)
        if self._resume is not None:
            packer.add(self._restore_pending(self._resume.pending))
        documents = self._documents()
        while True:
            wanted = self.batch_rows(self.state.rows_emitted * world)
            rows: list[list[Piece]] = []
            while True:
                last_epoch = config.epochs is not None and epoch + 1 >= config.epochs
                ran_out = False
                while len(rows) < wanted:
                    if packer.has_full_lookahead():
                        rows.append(packer.pop_row())
                    elif (document := next(documents, None)) is not None:
                        consumed += 1
                        packer.add(self._pieces(document, epoch))
                    elif last_epoch and packer.pending:  # the data's end: pack what is left
                        rows.append(packer.pop_row())
                    else:
                        ran_out = True
                        break
                next_epoch, every_rank_has_rows, some_rank_ends = self._agree(
                    ran_out and not last_epoch, bool(rows), len(rows) < wanted
                )
                if not next_epoch:
                    break
                for document in documents:  # the rest of this rank's share, for the packer to carry over
                    consumed += 1
                    packer.add(self._pieces(document, epoch))
                epoch, consumed = epoch + 1, 0
                documents = self._documents()
            if not every_rank_has_rows:
                if rows:
                    warnings.warn(
                        f"{self.path}: another rank's data ended first, so this rank drops its last "
                        f"{len(rows)} rows and every rank stops at the same batch"
                    )
                break
            pending = tuple((p.epoch, *p.key()) for p in packer.pending)
            self.state = RankState(epoch, consumed, pending, self.state.rows_emitted + len(rows))
            batch = collate_rows(rows, config.max_seq_len, self.tokenizer.cls_id, self.tokenizer.sep_id, self.masker)
            self.real_tokens += batch.num_tokens
            self.capacity_tokens += batch.num_rows * batch.row_tokens
            yield batch
            if some_rank_ends:
                break
        self.state = RankState(config.epochs, 0, (), self.state.rows_emitted)

    def _agree(self, ran_out: bool, has_rows: bool, ends: bool) -> tuple[bool, bool, bool]:
        """Over all ranks: (whether one ran out of its share of the epoch's documents, so that all
        must open the next epoch now; whether every rank has rows for a batch; whether one rank's
        data ends with this batch). One small all-reduce under several processes; a finite loader's
        longer ranks thereby drop their excess rows rather than wait forever for the shorter ones."""
        _, world = _world()
        if world == 1:
            return ran_out, has_rows, ends
        flags = torch.tensor([ran_out, not has_rows, ends], dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._host_group)
        ran_out, no_rows, ends = flags.tolist()
        return bool(ran_out), not no_rows, bool(ends)
