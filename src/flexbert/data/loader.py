"""The packed MLM loader: streamed documents -> packed, masked, unpadded batches, resumable exactly.

Resumption without replay. The loader's state is, per rank, the epoch, how many documents of its
partition it has consumed, and the keys of the pieces still pending in the packer. On resume,
streaming restarts the epoch at the largest whole-batch offset that every rank has passed, the
documents past it that some rank already consumed are skipped, and pending pieces are re-read by
sample id. On as many processes as before, the result is the exact row sequence an uninterrupted
run would produce.

Resumption on another number of processes. streaming's sample order within an epoch is one global
sequence, fixed by ``num_canonical_nodes`` and the seed whatever the world size; a world of ``W``
ranks deals it out round-robin, so a rank's ``k``-th document after the resume point is the one at
position ``k * W + slot``. The state therefore names the consumed documents past the resume point
by their positions, which any world size can skip, and deals all ranks' pending pieces out anew:
every document of the epoch is trained once, none skipped and none repeated.

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

from flexbert.core.model.config import Objective
from flexbert.core.tokenizer import MLMTokenizer
from flexbert.data.packing import (
    DEFAULT_MASK_SEED,
    GreedyPacker,
    Masker,
    PackedBatch,
    Piece,
    collate_rows,
    next_token_labels,
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
    # Where streaming opened this partition: the global position in the epoch's sample order (its
    # sample_in_epoch), and the positions past it, counted from it, that earlier ranks consumed.
    base: int = 0
    taken: tuple[int, ...] = ()


@dataclass(frozen=True)
class Layout:
    """How a world of ranks is spread over nodes, which fixes where each rank reads in streaming's
    global sample order."""

    world: int
    ranks_per_node: int

    @property
    def nodes(self) -> int:
        return self.world // self.ranks_per_node

    def slot(self, rank: int) -> int:
        """The rank's residue in the global order: streaming deals positions out to nodes
        round-robin, and each node's share to its ranks round-robin, so rank ``local`` of node
        ``node`` reads the positions ``k * world + local * nodes + node``."""
        node, local = divmod(rank, self.ranks_per_node)
        return local * self.nodes + node


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _layout() -> Layout:
    """This run's layout, as streaming reads it (Composer's launcher sets LOCAL_WORLD_SIZE)."""
    _, world = _world()
    return Layout(world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))


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
        objective: Objective = "mlm",
        phase_rows: float | None = None,
    ):
        """``batch_rows`` is this rank's rows per batch, or a function of the global rows emitted so
        far that gives them (batch-size warmup); by default ``config.rows_per_batch``. ``objective``
        is the model's: masked tokens to predict (mlm), or every next token (clm). ``phase_rows`` is
        the training phase's length in global rows, over which a mask-rate schedule runs: each batch
        is masked at the rate for the rows emitted before it over ``phase_rows``, the measure of
        batch-size warmup (tokens as rows of ``max_seq_len``), which every rank knows without asking
        the others and a resumed loader restores with its state."""
        config = config.with_seeds(DEFAULT_SHUFFLE_SEED, DEFAULT_MASK_SEED)
        batch_rows = batch_rows or config.rows_per_batch
        if batch_rows is None:
            raise ConfigError(f"{path}.rows_per_batch", "missing: how many packed rows go into one batch")
        if objective == "mlm" and config.masking.scheduled and phase_rows is None:
            raise ConfigError(
                f"{path}.masking.mlm_probability",
                "a schedule runs over a training phase, and this loader is not one's: give one rate",
            )
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
        self.masker = (
            Masker(config.masking, tokenizer.mask_id, tokenizer.special_mask())
            if objective == "mlm"
            else next_token_labels
        )
        self.phase_rows = phase_rows
        self.mask_rate: float | None = None  # the last batch's (none where nothing is masked)
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
            "ranks_per_node": _layout().ranks_per_node,
            "num_canonical_nodes": self.dataset.num_canonical_nodes,
            "sample_batch_size": self.config.sample_batch_size,
            "ranks": [vars(s) | {"pending": [list(k) for k in s.pending], "taken": list(s.taken)} for s in states],
        }

    def load_state_dict(self, state: dict) -> None:
        rank, _ = _world()
        layout = _layout()
        if state["sample_batch_size"] != self.config.sample_batch_size:
            raise DataError(
                f"{self.path}.sample_batch_size: the loader state was saved with "
                f"{state['sample_batch_size']}, this run has {self.config.sample_batch_size}; "
                "resuming needs it unchanged"
            )
        # States saved before these keys existed came from one node, without skipped positions,
        # and their pending keys (before pieces carried their epoch) are of the state's own epoch.
        saved = Layout(state["world_size"], state.get("ranks_per_node", state["world_size"]))
        canonical_nodes = state.get("num_canonical_nodes", self.dataset.num_canonical_nodes)
        ranks = [
            RankState(
                r["epoch"],
                r["consumed"],
                tuple(tuple(k) if len(k) == 5 else (r["epoch"], *k) for k in r["pending"]),
                r["rows_emitted"],
                r.get("base", 0),
                tuple(r.get("taken", ())),
            )
            for r in state["ranks"]
        ]
        # Every rank opens each epoch together (see _agree), and a finished loader records its end
        # on every rank, so the ranks share the epoch and the partition's base.
        epoch, base = ranks[0].epoch, ranks[0].base
        batch = self.config.sample_batch_size
        offset = min(r.consumed for r in ranks) // batch * batch  # documents per rank; streaming
        resume_at = base + offset * saved.world  # counts all ranks together
        self._check_streaming_can_resume(saved, layout, canonical_nodes, resume_at)
        # Positions past resume_at that some rank already consumed: its own reads, and the
        # positions it skipped as taken before.
        taken = {position - offset * saved.world for position in ranks[0].taken if position >= offset * saved.world}
        for old_rank, old in enumerate(ranks):
            slot = saved.slot(old_rank)
            taken.update(k * saved.world + slot - offset * saved.world for k in range(offset, old.consumed))
        if saved == layout:
            pending = ranks[rank].pending  # each rank its own: the uninterrupted run, bit for bit
        else:
            pending = tuple(key for old in ranks for key in old.pending)[rank :: layout.world]
        rows_so_far = ranks[0].rows_emitted * saved.world
        if rows_so_far % layout.world:
            raise DataError(
                f"{self.path}: {rows_so_far} rows were trained on {saved.world} processes, which "
                f"{layout.world} processes cannot continue in equal shares; resume on a process count "
                "that divides every batch of the run"
            )
        self.state = RankState(epoch, 0, pending, rows_so_far // layout.world, resume_at, tuple(sorted(taken)))
        self._resume = self.state
        self.dataset.load_state_dict(
            {
                "epoch": epoch,
                "sample_in_epoch": resume_at,
                "num_canonical_nodes": canonical_nodes,
                "shuffle_seed": self.config.shuffle_seed,
                "initial_physical_nodes": None,
            }
        )

    def _check_streaming_can_resume(self, saved: Layout, layout: Layout, canonical_nodes: int, resume_at: int) -> None:
        """streaming lays an epoch out over ``num_canonical_nodes``, and stripes it over the physical
        nodes only where one count divides the other; and it rounds a resume point down to a
        multiple of the node count, which would repeat documents. Say so before training starts."""
        nodes = layout.nodes
        if canonical_nodes % nodes and nodes % canonical_nodes:
            raise DataError(
                f"{self.path}: this run was saved on {saved.nodes} node(s), with streaming's sample order "
                f"laid out for num_canonical_nodes={canonical_nodes}; streaming cannot resume it on "
                f"{nodes} nodes, since neither count divides the other. Resume on a node count that "
                f"divides {canonical_nodes} or is a multiple of it"
            )
        if resume_at % nodes:
            raise DataError(
                f"{self.path}: the resume point, document {resume_at} of the epoch, is not a multiple "
                f"of the {nodes} nodes, and streaming would round it down and repeat documents; resume "
                f"on {saved.nodes} node(s), or on a node count that divides {resume_at}"
            )

    # --- iteration -------------------------------------------------------------------------------

    def _documents(self) -> Iterator[tuple[int, dict]]:
        """This rank's documents of streaming's next epoch, from where the resume state says, each
        with how many of its partition's documents have been read with it (those some rank already
        consumed, skipped here, count). The first is fetched at once: streaming opens an epoch with
        a barrier across the node's ranks, which every rank must reach now, not when it next needs
        a document."""
        loader = DataLoader(
            self.dataset,
            batch_size=self.config.sample_batch_size,
            num_workers=self.config.num_workers,
            collate_fn=_identity,
        )
        taken = set(self._resume.taken) if self._resume is not None else set()
        self._resume = None
        rank, _ = _world()
        layout = _layout()
        slot = layout.slot(rank)
        documents = (
            (read, document)
            for read, document in enumerate((sample for batch in loader for sample in batch), start=1)
            if (read - 1) * layout.world + slot not in taken
        )
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
        epoch, consumed, base, taken = self.state.epoch, self.state.consumed, self.state.base, self.state.taken
        if config.epochs is not None and epoch >= config.epochs:
            return
        packer = GreedyPacker(config.max_seq_len, config.lookahead)
        if self._resume is not None:
            packer.add(self._restore_pending(self._resume.pending))
        documents = self._documents()
        while True:
            rows_so_far = self.state.rows_emitted * world
            wanted = self.batch_rows(rows_so_far)
            rows: list[list[Piece]] = []
            while True:
                last_epoch = config.epochs is not None and epoch + 1 >= config.epochs
                ran_out = False
                while len(rows) < wanted:
                    if packer.has_full_lookahead():
                        rows.append(packer.pop_row())
                    elif (read := next(documents, None)) is not None:
                        consumed, document = read
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
                for _, document in documents:  # the rest of this rank's share, for the packer to carry over
                    packer.add(self._pieces(document, epoch))
                epoch, consumed, base, taken = epoch + 1, 0, 0, ()
                documents = self._documents()
            if not every_rank_has_rows:
                if rows:
                    warnings.warn(
                        f"{self.path}: another rank's data ended first, so this rank drops its last "
                        f"{len(rows)} rows and every rank stops at the same batch"
                    )
                break
            pending = tuple((p.epoch, *p.key()) for p in packer.pending)
            self.state = RankState(epoch, consumed, pending, self.state.rows_emitted + len(rows), base, taken)
            labeller = self.masker
            if isinstance(labeller, Masker):  # (the causal objective's labels have no rate)
                progress = min(1.0, rows_so_far / self.phase_rows) if self.phase_rows else 0.0
                self.mask_rate = config.masking.rate_at(progress)
                labeller = labeller.at_rate(self.mask_rate)
            batch = collate_rows(rows, config.max_seq_len, self.tokenizer.cls_id, self.tokenizer.sep_id, labeller)
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
