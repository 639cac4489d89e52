"""The packed MLM loader: streamed documents -> packed, masked, unpadded batches, resumable exactly.

Resumption without replay. The loader's state is, per rank, the epoch, how many documents of its
partition it has consumed, and the keys of the pieces still pending in the packer. On resume,
streaming restarts the epoch at the largest whole-batch offset that every rank has passed, each
rank skips its few remaining consumed documents, and pending pieces are re-read by sample id. The
result is the exact row sequence an uninterrupted run would produce.
"""

from __future__ import annotations

import os
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

    def _epoch_batches(self, epoch: int) -> Iterator[PackedBatch]:
        config = self.config
        packer = GreedyPacker(config.max_seq_len, config.lookahead)
        consumed = 0
        if self._resume is not None:
            packer.add(self._restore_pending(self._resume.pending))
            consumed = self._resume.consumed
        rows = []
        _, world = _world()
        rows_emitted = self.state.rows_emitted
        wanted = self.batch_rows(rows_emitted * world)

        def emit() -> PackedBatch:
            nonlocal rows_emitted, wanted
            batch = collate_rows(rows, config.max_seq_len, self.tokenizer.cls_id, self.tokenizer.sep_id,
                                 self.masker, epoch)
            rows_emitted += len(rows)
            wanted = self.batch_rows(rows_emitted * world)
            self.state = RankState(epoch, consumed, tuple(p.key() for p in packer.pending), rows_emitted)
            self.real_tokens += batch.num_tokens
            self.capacity_tokens += batch.num_rows * batch.row_tokens
            rows.clear()
            return batch

        for document in self._documents():
            consumed += 1
            packer.add(self._pieces(document))
            while packer.has_full_lookahead():
                rows.append(packer.pop_row())
                if len(rows) == wanted:
                    yield emit()
        self._resume = None
        while packer.pending:
            rows.append(packer.pop_row())
            if len(rows) == wanted:
                yield emit()
        if rows:
            yield emit()
        self.state = RankState(epoch + 1, 0, (), rows_emitted)

    def __iter__(self) -> Iterator[PackedBatch]:
        epoch = self.state.epoch
        while self.config.epochs is None or epoch < self.config.epochs:
            yield from self._epoch_batches(epoch)
            epoch += 1
