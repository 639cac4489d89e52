"""Resuming on another number of processes: 2 -> 1 and 1 -> 2, under DDP and FSDP2.

The loader deals streaming's one global sample order out to however many ranks there are, so a run
checkpointed on N processes and resumed on M trains every document of the epoch once: none skipped,
none repeated, with the same global batch and schedule (each rank's rows and accumulation adapt).
First the loader alone, on documents of every length (ranks then consume them at different rates);
then whole training runs, killed after a checkpoint and resumed on the other process count, against
an uninterrupted run, on documents of one row each, so that every run ends at the same step with
the whole corpus trained.
"""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import TOKENIZER
from data_helpers import random_lengths, write_stream
from streaming.base.partition import get_partitions
from test_resume import sigkill_mid_step
from train_helpers import free_port, run_recipe, tiny_recipe, write_recipe

from flexbert.core.tokenizer import load_tokenizer
from flexbert.data.loader import Layout, PackedMLMLoader
from flexbert.data.streams import DataError, LoaderConfig
from flexbert.train.data_order import recorded_steps, trained_pieces
from flexbert.train.loggers import read_metrics
from flexbert.typed_config import from_dict

pytestmark = pytest.mark.xdist_group("streaming")  # trainings never share the 2 cores

WORKER = Path(__file__).with_name("elastic_loader_worker.py")
LAUNCHER_VARIABLES = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"}


def run_loader(config: Path, out: Path, processes: int, batches: int, state: Path | None = None) -> None:
    """``elastic_loader_worker.py`` on ``processes`` ranks (gloo), as a launcher would start them."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    arguments = [sys.executable, str(WORKER), str(config), str(out), str(batches), *([str(state)] if state else [])]
    # One process runs without a process group: no launcher variables, whatever this process inherited
    # (an earlier in-process test under the same xdist worker may have set some).
    alone = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    world = {"WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes), "MASTER_ADDR": "127.0.0.1"}
    ranks = [
        subprocess.Popen(
            arguments,
            env=alone | world | {"RANK": str(r), "LOCAL_RANK": str(r), "MASTER_PORT": str(port)}
            if processes > 1
            else alone,
        )
        for r in range(processes)
    ]
    assert [rank.wait(timeout=240) for rank in ranks] == [0] * processes


def keys_of(out: Path) -> list[tuple[int, int, int, int]]:
    return [
        tuple(key)
        for path in sorted(out.glob("rank*_keys.json"))
        for batch in json.loads(path.read_text())
        for key in batch
    ]


def tokens(pieces) -> int:
    return sum(end - start for _, _, start, end in pieces)


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_the_loader_resumed_on_another_process_count_reads_every_piece_once(tmp_path, before, after):
    """Interrupted after 5 batches on ``before`` ranks, resumed on ``after`` until the epoch ends:
    the pieces read before and after are every piece of the corpus, each once, as one process reads
    them uninterrupted. Documents of every length: the ranks had consumed different numbers of
    documents, and held different pieces in their packers, when the state was saved."""
    corpus = tmp_path / "corpus"
    for seed, (name, count) in enumerate({"web": 70, "code": 50}.items()):
        write_stream(corpus, name, random_lengths(count, seed=seed, high=600), seed=seed)
    config = tmp_path / "loader.json"
    config.write_text(
        json.dumps(
            dict(
                tokenizer=str(TOKENIZER),
                max_seq_len=128,
                rows_per_batch=2,
                sample_batch_size=4,
                lookahead=4,
                epochs=1,
                streams={name: {"local": str(corpus / name)} for name in ("web", "code")},
            )
        )
    )
    run_loader(config, tmp_path / "whole", 1, -1)
    every_piece = Counter(keys_of(tmp_path / "whole"))
    assert max(every_piece.values()) == 1

    run_loader(config, tmp_path / "head", before, 5)
    state = json.loads((tmp_path / "head" / "rank0_state.json").read_text())
    if before == 2:
        consumed = [rank["consumed"] for rank in state["ranks"]]
        assert consumed[0] != consumed[1]  # the case that needs the skipped positions
    run_loader(config, tmp_path / "tail", after, -1, tmp_path / "head" / "rank0_state.json")
    read = Counter(keys_of(tmp_path / "head")) + Counter(keys_of(tmp_path / "tail"))
    if after == 2:
        # Two ranks end the epoch together: the one with rows left over drops them, and what its
        # packer still held (a warning says so), as an uninterrupted two-process run does. So
        # nothing may be read twice, and no more may be missing than such a run leaves at the end,
        # give or take one batch of rows (2 of 126 tokens).
        assert max(read.values()) == 1 and set(read) <= set(every_piece)
        run_loader(config, tmp_path / "two", 2, -1)
        left_at_the_end = tokens(set(every_piece) - set(keys_of(tmp_path / "two")))
        assert 0 < tokens(set(every_piece) - set(read)) <= left_at_the_end + 2 * 126
    else:
        assert read == every_piece


@pytest.mark.parametrize("nodes, ranks_per_node, workers", [(1, 2, 1), (2, 1, 1), (2, 2, 2), (2, 4, 1), (4, 2, 2)])
@pytest.mark.parametrize("resume_at", [0, 24])
def test_each_rank_reads_every_world_th_position_from_its_slot(nodes, ranks_per_node, workers, resume_at):
    """The layout the elastic resume rests on, against streaming's own partitioner: from a resume
    point on, the ``k``-th document a rank reads (its DataLoader takes its workers' batches in
    turn) is the one at position ``k * world + slot`` of the one global order that a single
    process reads, for every node and rank count and ``num_canonical_nodes``."""
    world, batch, samples = nodes * ranks_per_node, 4, 96

    def partition(physical_nodes: int, ranks: int, workers: int):
        return get_partitions("orig", samples, nodes, physical_nodes, ranks, workers, batch, resume_at)

    global_order = partition(1, 1, 1).reshape(-1)
    ours = partition(nodes, ranks_per_node, workers)  # [node, rank, worker, batches, batch]
    layout = Layout(world, ranks_per_node)
    for rank in range(world):
        read = ours[rank // ranks_per_node, rank % ranks_per_node].transpose(1, 0, 2).reshape(-1)
        read = read[read >= 0]
        expected = global_order[layout.slot(rank) :: world]
        assert len(read) == len(expected) == (samples - resume_at) // world
        assert (read == expected).all()


def test_changes_streaming_cannot_follow_stop_in_one_line(tmp_path):
    """A node count that neither divides ``num_canonical_nodes`` nor is a multiple of it, and a
    resume point that streaming would round down to a multiple of the nodes: each stops with one
    line naming what to do, before a batch is read."""
    corpus = tmp_path / "corpus"
    write_stream(corpus, "web", [40] * 12)
    config = from_dict(
        LoaderConfig,
        dict(
            tokenizer=str(TOKENIZER), max_seq_len=64, rows_per_batch=2, streams={"web": {"local": str(corpus / "web")}}
        ),
        "train_loader",
    )
    loader = PackedMLMLoader(config, load_tokenizer(TOKENIZER))
    with pytest.raises(
        DataError, match=r"saved on 2 node\(s\), .*num_canonical_nodes=2; streaming cannot resume it on 3 nodes"
    ):
        loader._check_streaming_can_resume(Layout(4, 2), Layout(6, 2), 2, 64)
    with pytest.raises(DataError, match="document 64 of the epoch, is not a multiple of the 3 nodes"):
        loader._check_streaming_can_resume(Layout(1, 1), Layout(3, 1), 6, 64)
    loader._check_streaming_can_resume(Layout(4, 2), Layout(8, 2), 2, 64)  # 4 nodes on 2 canonical: fine


# --- whole runs ------------------------------------------------------------------------------------

DOCUMENTS = {"web": 48, "code": 32}  # 80 documents of one row each: 10 steps of 8 rows
STEPS = 10


@pytest.fixture(scope="module")
def one_row_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("one-row-corpus")
    for seed, (name, count) in enumerate(DOCUMENTS.items()):
        # 62 tokens framed by [CLS] and [SEP] fill a row of 64 exactly, over a small vocabulary
        write_stream(root, name, [62] * count, vocab=400, seed=seed)
    return root


def elastic_recipe(corpus: Path, run_root: Path, sharded: bool) -> dict:
    return tiny_recipe(
        corpus,
        run_root,
        global_batch_rows=8,
        max_duration=f"{STEPS}ba",
        save_interval="3ba",
        autoresume=True,
        **{"train_loader.epochs": 1, "logging.peak_tflops": 1.0},
        **({"fsdp_config": {}} if sharded else {}),
    )


def steps_trained(run_dir: Path) -> list[int]:
    return [row["step"] for row in read_metrics(run_dir) if "loss/train/total" in row]


@pytest.fixture(scope="module")
def uninterrupted(one_row_corpus, tmp_path_factory):
    """Two processes, DDP, never stopped: every document once, in 10 steps."""
    root = tmp_path_factory.mktemp("uninterrupted")
    run_recipe(write_recipe(root / "recipe.yaml", elastic_recipe(one_row_corpus, root, sharded=False)), nproc=2)
    pieces = trained_pieces(root / "tiny")
    assert sum(pieces.values()) == len(pieces) == sum(DOCUMENTS.values())
    return root / "tiny"


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp2"])
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_a_run_killed_on_n_processes_resumes_on_m_with_every_document_once(
    one_row_corpus, uninterrupted, tmp_path, before, after, sharded
):
    """Killed inside step 5 on ``before`` processes (the checkpoint of step 3 is the newest; steps
    3 and 4 were trained after it), then the same recipe on ``after`` processes: it resumes from the
    checkpoint (a whole file under DDP, one shard per rank under FSDP2) and trains exactly the
    documents of the uninterrupted run, each once, in as many steps. The record of a rank that is
    gone keeps only the steps before the checkpoint."""
    recipe = write_recipe(tmp_path / "recipe.yaml", elastic_recipe(one_row_corpus, tmp_path, sharded))
    run_dir = tmp_path / "tiny"
    sigkill_mid_step(recipe, 5, tmp_path / "paused", nproc=before)
    assert all(steps[:5] == list(range(5)) for steps in recorded_steps(run_dir).values())

    run_recipe(recipe, nproc=after)
    assert sorted(set(steps_trained(run_dir))) == list(range(STEPS))
    assert trained_pieces(run_dir) == trained_pieces(uninterrupted)
    if before > after:
        assert recorded_steps(run_dir)[1] == [0, 1, 2]
