"""The packed MLM loader: streamed documents -> packed, masked, unpadded batches, resumable exactly.

Resumption without replay. The loader's state is, per rank, the epoch, how many documents of its
partition it has consumed, and the keys of the pieces still pending in the packer. On resume,
streaming restarts the epoch at the largest whole-batch offset that every rank has passed, each
rank skips its few remaining consumed documents, and pending pieces are re-read by sample id. The
result is the exact row sequence an uninterrupted run would produce.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch.distributed as dist
from torch.utils.data import DataLoader

from flexbert.data.masking import Masker
from flexbert.data.packing import GreedyPacker, PackedBatch, Piece, collate_rows, split_document
from flexbert.data.shm import clean_stale_streaming_memory
from flexbert.data.streams import DataError, DocumentDataset, LoaderConfig, build_dataset
from flexbert.data.tokenizer import MLMTokenizer


@dataclass
class RankState:
    epoch: int = 0
    consumed: int = 0  # documents of this epoch's partition pulled into the packer
    pending: tuple[tuple[int, int, int, int], ...] = ()  # (stream, sample, start, end) still unpacked
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

    def __init__(self, config: LoaderConfig, tokenizer: MLMTokenizer, model_vocab_size: int | None = None,
                 path: str = "train_loader", batch_rows: Callable[[int], int] | None = None):
        """``batch_rows(global_rows_so_far)`` gives this rank's rows for the next batch (batch-size
        warmup); by default every batch has ``config.rows_per_batch`` rows."""
        config.validate(path)
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
        self.batch_rows = batch_rows or (lambda rows_so_far: config.rows_per_batch)
        self.path = path
        self.state = RankState()  # as of the last batch handed out
        self._resume: RankState | None = None
        self._position: tuple[int, int, tuple] = (0, 0, ())  # (epoch, consumed, pending) after the last row packed
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
            dist.all_gather_object(states, self.state)
        else:
            states = [self.state]
        return {"world_size": world, "sample_batch_size": self.config.sample_batch_size,
                "ranks": [vars(s) | {"pending": [list(k) for k in s.pending]} for s in states]}

    def load_state_dict(self, state: dict) -> None:
        rank, world = _world()
        if state["world_size"] != world or state["sample_batch_size"] != self.config.sample_batch_size:
            raise DataError(
                f"loader state was saved with world_size={state['world_size']}, sample_batch_size="
                f"{state['sample_batch_size']}; this run has {world} and {self.config.sample_batch_size}. "
                "Exact resumption needs both unchanged."
            )
        ranks = [RankState(r["epoch"], r["consumed"], tuple(tuple(k) for k in r["pending"]), r["rows_emitted"])
                 for r in state["ranks"]]
        self._resume = ranks[rank]
        self.state = ranks[rank]
        batch = self.config.sample_batch_size
        whole_batches = min(r.consumed for r in ranks if r.epoch == self._resume.epoch) // batch
        self._resume_offset = whole_batches * batch  # per rank; streaming counts all ranks together
        self.dataset.load_state_dict({
            "epoch": self._resume.epoch,
            "sample_in_epoch": self._resume_offset * world,
            "num_canonical_nodes": self.dataset.num_canonical_nodes,
            "shuffle_seed": self.config.shuffle_seed,
            "initial_physical_nodes": None,
        })

    # --- iteration -------------------------------------------------------------------------------

    def _documents(self) -> Iterator[dict]:
        """This rank's documents for one epoch, from where the resume state says."""
        loader = DataLoader(self.dataset, batch_size=self.config.sample_batch_size,
                            num_workers=self.config.num_workers, collate_fn=_identity)
        documents = (sample for batch in loader for sample in batch)
        if self._resume is not None:
            for _ in range(self._resume.consumed - self._resume_offset):
                next(documents)
        yield from documents

    def _pieces(self, document: dict) -> list[Piece]:
        tokens = document["input_ids"]
        if tokens.size and int(tokens.max()) >= self.vocab_limit:
            raise DataError(
                f"stream {list(self.config.streams)[document['stream']]!r} sample {document['sample']}: "
                f"token id {int(tokens.max())} is outside the model's vocabulary ({self.vocab_limit})"
            )
        return split_document(document["stream"], document["sample"], tokens, self.config.max_seq_len)

    def _restore_pending(self, keys) -> list[Piece]:
        pieces = []
        for stream, sample, start, end in keys:
            tokens = self.dataset[sample]["input_ids"]
            pieces.append(Piece(stream, sample, start, end, tokens[start:end]))
        return pieces

    def _epoch_rows(self, epoch: int) -> Iterator[list[Piece]]:
        """This rank's packed rows of one epoch. Before each row is handed on, ``self._position``
        says where the epoch stands once that row is out: documents consumed, pieces pending."""
        packer = GreedyPacker(self.config.max_seq_len, self.config.lookahead)
        consumed = 0
        if self._resume is not None:
            packer.add(self._restore_pending(self._resume.pending))
            consumed = self._resume.consumed

        def row() -> list[Piece]:
            pieces = packer.pop_row()
            self._position = (epoch, consumed, tuple(p.key() for p in packer.pending))
            return pieces

        for document in self._documents():
            consumed += 1
            packer.add(self._pieces(document))
            while packer.has_full_lookahead():
                yield row()
        self._resume = None
        while packer.pending:
            yield row()

    def _rows(self) -> Iterator[tuple[int, list[Piece]]]:
        """(epoch, row) for every row from the current state on, epoch after epoch."""
        epoch = self.state.epoch
        while self.config.epochs is None or epoch < self.config.epochs:
            for row in self._epoch_rows(epoch):
                yield epoch, row
            epoch += 1

    def _emit(self, rows: list[tuple[int, list[Piece]]]) -> PackedBatch:
        config = self.config
        batch = collate_rows([row for _, row in rows], config.max_seq_len, self.tokenizer.cls_id,
                             self.tokenizer.sep_id, self.masker, [epoch for epoch, _ in rows])
        self.state = RankState(*self._position, self.state.rows_emitted + len(rows))
        self.real_tokens += batch.num_tokens
        self.capacity_tokens += batch.num_rows * batch.row_tokens
        return batch

    def __iter__(self) -> Iterator[PackedBatch]:
        """Batches of ``batch_rows(...)`` rows. An epoch's last rows open the next epoch's first
        batch rather than forming a short batch of their own, so every rank emits the same number of
        rows per batch, which the batch-size schedule counts on. A loader with a finite number of
        ``epochs`` ends with a short batch, and all ranks end together (see :meth:`_agree`)."""
        _, world = _world()
        rows = self._rows()
        while True:
            wanted = self.batch_rows(self.state.rows_emitted * world)
            batch_rows = list(itertools.islice(rows, wanted))
            every_rank_has_one, some_rank_ends = self._agree(bool(batch_rows), len(batch_rows) < wanted)
            if not every_rank_has_one:
                if batch_rows:
                    warnings.warn(f"{self.path}: another rank's data ended first, so this rank drops its last "
                                  f"{len(batch_rows)} rows and every rank stops at the same batch")
                break
            yield self._emit(batch_rows)
            if some_rank_ends:
                break
        self.state = RankState(self.config.epochs, 0, (), self.state.rows_emitted)

    def _agree(self, has_batch: bool, ends: bool) -> tuple[bool, bool]:
        """(whether every rank has a next batch, whether some rank's data ends with it).

        The ranks of a finite loader pack different numbers of rows from their equal shares of
        documents. A rank that stopped early would leave the others waiting forever in their next
        collective, so under several processes the ranks agree before each batch and stop together,
        the longer ranks dropping their excess. A loader that cycles forever never ends and never asks.
        """
        _, world = _world()
        if world == 1 or self.config.epochs is None:
            return has_batch, ends
        answers = [None] * world
        dist.all_gather_object(answers, (has_batch, ends))
        return all(has for has, _ in answers), any(end for _, end in answers)
