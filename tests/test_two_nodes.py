"""Two nodes on one machine, as a cluster launches them: ``composer --world_size 2 --nproc 1
--node_rank N --master_addr 127.0.0.1 ...`` once per node, at the same time.

As on two machines, each node reads the streams of a shared "remote" folder through its own cache
folder, with its own temporary folder and, where the kernel lets us mount one, its own /dev/shm; the
run folder is shared, as a cluster's filesystem is. The run stops after 3 steps, the same command
resumes it to 6, and the hf_export callback exports at both. Against ``composer -n 2`` on one node
with the same recipe: every rank trains on the same pieces, the losses and final weights are equal.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from train_helpers import environment, free_port, run_recipe, tiny_recipe, write_corpus, write_recipe

from flexbert.core.checkpoint import LATEST_LINK
from flexbert.train.data_order import StreamLayout, read_data_order, recorded_steps
from flexbert.train.loggers import read_metrics

pytestmark = pytest.mark.xdist_group("streaming")  # trainings never share the 2 cores

STEPS, FIRST_STEPS = 6, 3
STREAMS = ("web", "code")
# A node's own /dev/shm: a tmpfs mounted in a mount namespace of its own (as root, or as root of a
# user namespace), gone with the node's last process, so a killed node leaves nothing behind.
MOUNT_SHM = 'mount -t tmpfs -o size=256m tmpfs /dev/shm && exec "$@"'
NAMESPACES = (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"])
LAUNCH_TIMEOUT = 240  # seconds, for both nodes together: a node that hangs fails the test
AFTER_FAILURE = 15  # seconds the other node gets to exit after one failed, before it is killed


def private_shm_prefix() -> list[str] | None:
    """The command prefix that gives a process its own /dev/shm, or None where neither namespace may
    be made here (an unprivileged container): the nodes then share the machine's /dev/shm."""
    for namespace in NAMESPACES:
        wrapper = [*namespace, "--propagation", "private", "sh", "-c", MOUNT_SHM, "sh"]
        try:
            if subprocess.run([*wrapper, "true"], capture_output=True, timeout=30).returncode == 0:
                return wrapper
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


def recipe(corpus: Path, run_root: Path, cache: Path | None = None, **overrides) -> dict:
    """The tiny recipe, its streams read from ``corpus`` as a remote, through ``cache`` where given
    (the nodes give theirs on the command line). num_canonical_nodes is fixed: streaming's default
    is the node count, which lays the epoch out differently on one node and on two."""
    streams = {
        name: {"remote": str(corpus / name)} | ({"local": str(cache / name)} if cache else {}) for name in STREAMS
    }
    return tiny_recipe(
        corpus,
        run_root,
        max_duration=f"{STEPS}ba",
        save_interval=f"{FIRST_STEPS}ba",
        global_batch_rows=8,
        autoresume=True,
        hf_export={"interval": f"{FIRST_STEPS}ba"},
        **{"train_loader.streams": streams, "train_loader.num_canonical_nodes": 2, "logging.peak_tflops": 1.0},
        **overrides,
    )


def launch_two_nodes(recipe_path: Path, root: Path, shm_prefix: list[str] | None) -> None:
    """Both nodes' launchers at once, each in a session of its own, its output in ``root/nodeN``;
    kills both sessions and fails with both nodes' stderr if either fails or they outlast the timeout."""
    port, nodes = free_port(), []
    for rank in (0, 1):
        folder = root / f"node{rank}"
        (folder / "tmp").mkdir(parents=True, exist_ok=True)
        launcher = [
            str(Path(sys.executable).with_name("composer")),
            *("--world_size", "2", "--nproc", "1", "--node_rank", str(rank)),
            *("--master_addr", "127.0.0.1", "--master_port", str(port)),
            str(ROOT / "main.py"),
            str(recipe_path),
            *(f"train_loader.streams.{name}.local={folder / 'cache' / name}" for name in STREAMS),
        ]
        with (folder / "stdout").open("w") as stdout, (folder / "stderr").open("w") as stderr:
            process = subprocess.Popen(
                [*(shm_prefix or []), *launcher],
                cwd=ROOT,
                env=environment(2, TMPDIR=str(folder / "tmp")),
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
        nodes.append(process)
    deadline, failed_at = time.monotonic() + LAUNCH_TIMEOUT, None
    try:
        while None in (codes := [node.poll() for node in nodes]) and time.monotonic() < deadline:
            if failed_at is None and any(code not in (None, 0) for code in codes):
                failed_at = time.monotonic()  # the other node may wait for it in a collective
            if failed_at is not None and time.monotonic() > failed_at + AFTER_FAILURE:
                break
            time.sleep(0.2)
    finally:
        for node in nodes:  # the launcher and its rank, and a rank that outlived its launcher
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # every process of the session has exited
            node.wait()
    if any(node.returncode != 0 for node in nodes):
        report = [
            f"{recipe_path.name}: exit codes {[node.returncode for node in nodes]} (-9: killed, still running "
            f"{LAUNCH_TIMEOUT} s after the start or {AFTER_FAILURE} s after the other node failed)"
        ]
        for rank in (0, 1):
            report.append(f"--- node {rank} stderr ---\n{(root / f'node{rank}' / 'stderr').read_text()[-4000:]}")
        pytest.fail("\n".join(report))


@pytest.fixture(scope="session")  # not module: xdist may run another module's tests in between
def runs(tmp_path_factory):
    """The two-node run, stopped after step 3 with the machine's /dev/shm shared by both nodes (the
    fallback, exercised everywhere) and resumed to step 6 by the same command with a private
    /dev/shm per node (where it can be mounted); and the same recipe under ``composer -n 2``."""
    root = tmp_path_factory.mktemp("two_nodes")
    corpus = write_corpus(root / "remote")
    two_nodes = recipe(corpus, root / "two")
    first = write_recipe(root / "first.yaml", {**two_nodes, "max_duration": f"{FIRST_STEPS}ba"})
    shm_prefix = private_shm_prefix()
    launch_two_nodes(first, root, shm_prefix=None)
    # streaming names its file locks in the node's temporary folder after its shared-memory prefix.
    prefixes = [{lock.name[:6] for lock in (root / f"node{rank}" / "tmp").glob("*_filelock")} for rank in (0, 1)]
    lines_before_resume = (root / "two" / "tiny" / "metrics.jsonl").read_text().count("\n")
    launch_two_nodes(write_recipe(root / "full.yaml", two_nodes), root, shm_prefix)
    run_recipe(write_recipe(root / "one.yaml", recipe(corpus, root / "one", cache=root / "one-cache")), nproc=2)
    return {
        "two": root / "two" / "tiny",
        "one": root / "one" / "tiny",
        "corpus": corpus,
        "caches": [root / f"node{rank}" / "cache" for rank in (0, 1)],
        "lines_before_resume": lines_before_resume,
        "shared_shm_prefixes": prefixes,
    }


def losses(run_dir: Path) -> list[float]:
    return [row["loss/train/total"] for row in read_metrics(run_dir) if "loss/train/total" in row]


def test_two_nodes_train_as_two_processes_on_one_node_do(runs):
    """Same global batches on the same ranks, so the same arithmetic: the losses and the final
    weights are equal bit for bit, and every rank trained on the same pieces with the same masks.
    The two-node run was stopped and resumed, the one-node run was not: the resumption is exact."""
    two, one = losses(runs["two"]), losses(runs["one"])
    assert len(two) == STEPS and two == one
    assert read_data_order(runs["two"]) == read_data_order(runs["one"])
    final = torch.load(runs["two"] / "checkpoints" / LATEST_LINK, weights_only=False)["state"]["model"]
    expected = torch.load(runs["one"] / "checkpoints" / LATEST_LINK, weights_only=False)["state"]["model"]
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)


def test_each_node_reads_its_own_share_through_its_own_cache(runs):
    """No document is trained on by both ranks, every shard a rank trained from is in its node's
    cache, and no reader wrote into the remote folder (each stream there is as it was written)."""
    per_rank = read_data_order(runs["two"])
    samples = {rank: {(p[0], p[1]) for row in rows for p in row["pieces"]} for rank, rows in per_rank.items()}
    assert sorted(samples) == [0, 1] and samples[0] and samples[1]
    assert not samples[0] & samples[1]
    # The run numbers the streams in the order of its config (the recipe's YAML sorts them).
    names = list(json.loads((runs["two"] / "config.json").read_text())["train_loader"]["streams"])
    layout = StreamLayout({name: {"remote": str(runs["corpus"] / name)} for name in names})
    for rank, cache in enumerate(runs["caches"]):
        for stream, sample in samples[rank]:
            shard = layout.locate(stream, sample)[0]  # the compressed file; the cache keeps it decompressed
            name = names[stream]
            assert {shard, shard.removesuffix(".zstd")} & {p.name for p in (cache / name).iterdir()}, (rank, shard)
    for name in STREAMS:
        index = json.loads((runs["corpus"] / name / "index.json").read_text())
        written = {"index.json"} | {shard["zip_data"]["basename"] for shard in index["shards"]}
        assert {p.name for p in (runs["corpus"] / name).iterdir()} == written


def test_nodes_that_share_dev_shm_take_their_own_streaming_shared_memory(runs):
    """In the launch where both nodes share the machine's /dev/shm, each node's streaming dataset
    took a shared-memory prefix of its own. streaming's leaders both probe for the first free prefix
    before a barrier and create it after, so on one /dev/shm the second creation failed, and its
    retry fell out of step with the other node's collectives: the run hung."""
    node0, node1 = runs["shared_shm_prefixes"]
    assert len(node0) == len(node1) == 1 and node0 != node1, (node0, node1)


def test_the_same_command_resumes_from_the_checkpoint(runs):
    """The second launch went on from step 3: each rank recorded every step once, in order (a restart
    would have recorded steps 0-2 again), and its metrics begin at step 3."""
    assert recorded_steps(runs["two"]) == {0: list(range(STEPS)), 1: list(range(STEPS))}
    lines = (runs["two"] / "metrics.jsonl").read_text().splitlines()
    resumed = [json.loads(line)["step"] for line in lines[runs["lines_before_resume"] :]]
    assert resumed and min(resumed) == FIRST_STEPS, resumed
    assert sorted(p.name for p in (runs["two"] / "checkpoints").glob("ep0-ba*")) == [
        f"ep0-ba{FIRST_STEPS}-rank0.pt",
        f"ep0-ba{STEPS}-rank0.pt",
    ]


def test_the_hf_export_of_a_two_node_run_holds_its_final_weights(runs):
    """The hf_export callback exported in both launches (rank 0 writes, on node 0, while rank 1
    waits), and transformers loads the last export with the final checkpoint's weights."""
    transformers = pytest.importorskip("transformers")
    assert sorted(p.name for p in (runs["two"] / "hf").iterdir()) == [f"ba{FIRST_STEPS}", f"ba{STEPS}"]
    hf_model, info = transformers.AutoModelForMaskedLM.from_pretrained(
        runs["two"] / "hf" / f"ba{STEPS}", output_loading_info=True
    )
    assert not any(info.values())
    final = torch.load(runs["two"] / "checkpoints" / LATEST_LINK, weights_only=False)["state"]["model"]
    assert all(torch.equal(tensor, final[f"model.{name}"]) for name, tensor in hf_model.state_dict().items())
