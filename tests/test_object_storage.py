"""Checkpoints in object storage: ``save_folder: s3://...`` against a moto S3 server on loopback.

A run killed while a checkpoint is being uploaded (tests/stall_upload.py holds that upload in flight)
is relaunched by the same command: it resumes from the bucket's previous, complete checkpoint and
trains exactly as the killed run did, whole files on one process and FSDP2 shards on two. Then
``flexbert average``, ``export-hf`` and ``init_from`` read those checkpoints by URI, and bad inputs
stop in one line.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_remote_streaming import endpoint, point_at_server  # noqa: F401  (endpoint: the module's moto server)
from train_helpers import command, environment, tiny_recipe, write_corpus, write_recipe

from flexbert.cli import main as cli_main
from flexbert.core.checkpoint import read_weights
from flexbert.core.model import FlexBertForMaskedLM
from flexbert.core.model.tiling import tile_state_dict

pytestmark = pytest.mark.xdist_group("streaming")  # trainings never share the 2 cores
BUCKET = "checkpoints"
# Checkpoints at steps 3 and 6; the upload of the second is the one a kill cuts short.
RESUMABLE = {"max_duration": "6ba", "save_interval": "3ba", "autoresume": True, "logging.peak_tflops": 1.0}


@pytest.fixture(scope="module")
def s3(endpoint):  # noqa: F811
    """A boto3 client for the server, holding BUCKET; the environment points boto3 and Composer at it."""
    import boto3

    with pytest.MonkeyPatch.context() as patch:
        point_at_server(patch, endpoint)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        yield client


def keys(client, prefix: str) -> set[str]:
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return {item["Key"].removeprefix(prefix + "/") for item in listed}


def pointer(client, prefix: str) -> str:
    return client.get_object(Bucket=BUCKET, Key=f"{prefix}/latest-rank0.pt.symlink")["Body"].read().decode()


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every line logged, a resumed run's after the killed run's."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [(row["step"], row["loss/train/total"]) for row in rows if "loss/train/total" in row]


def launch(recipe: Path, nproc: int, root: Path, name: str, script: Path = ROOT / "main.py", **variables: str):
    """Start the run as a user does, from ``root/cwd``, with its temporary folder ``root/tmp-NAME``
    and its stderr in ``root/NAME.log``."""
    (root / "cwd").mkdir(exist_ok=True)
    (root / f"tmp-{name}").mkdir()
    with (root / f"{name}.log").open("w") as log:
        return subprocess.Popen(
            command(recipe, script, nproc),
            cwd=root / "cwd",
            env=environment(nproc, TMPDIR=str(root / f"tmp-{name}"), **variables),
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )


def kill_during_upload(s3, recipe: Path, prefix: str, stalled: str, landed: set[str], nproc: int, root: Path):
    """Run the recipe until the upload of the object ending in ``stalled`` is in flight, the objects
    ``landed`` are in the bucket and every step is logged (the run then waits for its uploads), then
    SIGKILL every process of the run."""
    markers = root / "stalled"
    process = launch(
        recipe,
        nproc,
        root,
        "killed",
        ROOT / "tests" / "stall_upload.py",
        FLEXBERT_TEST_STALL_UPLOAD=stalled,
        FLEXBERT_TEST_STALL_MARKERS=str(markers),
    )
    try:
        deadline = time.monotonic() + 400
        while not (
            list(markers.glob("rank*"))
            and 5 in [step for step, _ in losses(root / "tiny")]
            and landed <= keys(s3, prefix)
        ):
            assert process.poll() is None, (root / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the stalled upload never started"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)


def relaunch(recipe: Path, nproc: int, root: Path) -> str:
    """The same command, as a user runs it again; its stderr."""
    process = launch(recipe, nproc, root, "relaunched")
    assert process.wait(timeout=400) == 0, (root / "relaunched.log").read_text()[-3000:]
    return (root / "relaunched.log").read_text()


def killed_and_relaunched(
    s3, corpus, root: Path, prefix: str, stalled: str, landed: set[str], nproc: int, **overrides
) -> dict:
    recipe = tiny_recipe(corpus, root, save_folder=f"s3://{BUCKET}/{prefix}", **RESUMABLE, **overrides)
    path = write_recipe(root / "recipe.yaml", recipe)
    kill_during_upload(s3, path, prefix, stalled, landed, nproc, root)
    after_kill = {"keys": keys(s3, prefix), "pointer": pointer(s3, prefix), "losses": losses(root / "tiny")}
    stderr = relaunch(path, nproc, root)
    return {"root": root, "after_kill": after_kill, "stderr": stderr}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def whole(s3, corpus, tmp_path_factory):
    """One process, whole-file checkpoints: killed while uploading ep0-ba6-rank0.pt, relaunched."""
    root = tmp_path_factory.mktemp("whole")
    return killed_and_relaunched(s3, corpus, root, "whole", "ep0-ba6-rank0.pt", set(), 1)


@pytest.fixture(scope="module")
def sharded(s3, corpus, tmp_path_factory):
    """Two processes, FSDP2 shards: killed while rank 1 uploads its shard of ep0-ba6, relaunched."""
    root = tmp_path_factory.mktemp("sharded")
    return killed_and_relaunched(
        s3,
        corpus,
        root,
        "sharded",
        "ep0-ba6/__1_0.distcp",
        {"ep0-ba6/.metadata", "ep0-ba6/__0_0.distcp"},  # rank 0's part, uploaded
        2,
        global_batch_rows=8,
        fsdp_config={},
    )


def assert_resumed_exactly(run: dict) -> None:
    """The killed run logged steps 0-5; the relaunch, resuming at the checkpoint of step 3, logged
    steps 3-5 again, with the very same losses."""
    killed = run["after_kill"]["losses"]
    assert [step for step, _ in killed] == list(range(6))
    resumed = losses(run["root"] / "tiny")[len(killed) :]
    assert [step for step, _ in resumed] == [3, 4, 5]
    assert max(abs(loss - killed[step][1]) for step, loss in resumed) <= 1e-6, (resumed, killed)


def assert_nothing_left_behind(root: Path) -> None:
    """No copy of a checkpoint under the working directory (Composer's own remote autoresume makes
    ``./s3:/BUCKET/...``), nor in the temporary folder once the relaunched run is done."""
    assert list((root / "cwd").iterdir()) == []
    assert [path for path in (root / "tmp-relaunched").rglob("*") if path.name.startswith("ep0-")] == []


def download(s3, key: str, destination: Path) -> Path:
    """A checkpoint from the bucket, fetched here with boto3 alone: a file, or a folder of shards."""
    listed = [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=key).get("Contents", [])]
    if listed == [key]:
        s3.download_file(BUCKET, key, str(destination))
        return destination
    for name in listed:
        (destination / name.removeprefix(key + "/")).parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(BUCKET, name, str(destination / name.removeprefix(key + "/")))
    return destination


def test_a_whole_file_run_killed_mid_upload_resumes_from_the_previous_checkpoint(s3, whole):
    """One process: the pointer never named the checkpoint whose upload was cut short; the relaunch
    resumed from the one before, trained as the killed run did, and ended with the same weights and
    the pointer at its last checkpoint, leaving no local copy behind."""
    after_kill = whole["after_kill"]
    # The killed upload left nothing, and the pointer names the complete checkpoint before it.
    assert after_kill["keys"] == {"config.json", "ep0-ba3-rank0.pt", "latest-rank0.pt.symlink"}
    assert after_kill["pointer"] == "whole/ep0-ba3-rank0.pt"
    assert_resumed_exactly(whole)
    assert keys(s3, "whole") == {"config.json", "ep0-ba3-rank0.pt", "ep0-ba6-rank0.pt", "latest-rank0.pt.symlink"}
    assert pointer(s3, "whole") == "whole/ep0-ba6-rank0.pt"
    # The relaunch's final weights are those the killed run saved locally and never uploaded.
    (staged,) = (whole["root"] / "tmp-killed").rglob("ep0-ba6-rank0.pt")
    final = download(s3, "whole/ep0-ba6-rank0.pt", whole["root"] / "final.pt")
    expected, found = read_weights(staged)[0], read_weights(final)[0]
    assert all(torch.equal(found[name], expected[name]) for name in expected)
    assert_nothing_left_behind(whole["root"])


def test_a_sharded_run_killed_mid_upload_resumes_from_the_previous_checkpoint(s3, sharded):
    """Two processes under FSDP2: a checkpoint half uploaded (rank 0's shard and the metadata, not rank
    1's) is never resumed from; the relaunch warns about it, resumes from the complete one before,
    trains as the killed run did, and overwrites the partial one with a complete one."""
    after_kill = sharded["after_kill"]
    # Rank 0's part of ep0-ba6 reached the bucket, rank 1's never did: the pointer stayed at ep0-ba3.
    assert {"ep0-ba6/.metadata", "ep0-ba6/__0_0.distcp"} <= after_kill["keys"]
    assert "ep0-ba6/__1_0.distcp" not in after_kill["keys"]
    assert after_kill["pointer"] == "sharded/ep0-ba3"
    assert f"autoresume: s3://{BUCKET}/sharded/ep0-ba6 is newer than ep0-ba3" in sharded["stderr"]
    assert_resumed_exactly(sharded)
    # The relaunch replaced the partial checkpoint with a whole one, and points at it.
    shards = {".metadata", "__0_0.distcp", "__1_0.distcp"}
    assert {f"ep0-ba{step}/{name}" for step in (3, 6) for name in shards} <= keys(s3, "sharded")
    assert pointer(s3, "sharded") == "sharded/ep0-ba6"
    assert_nothing_left_behind(sharded["root"])


def test_average_export_hf_and_init_from_take_uris(s3, whole, sharded, corpus, tmp_path, capsys):
    """Whole files and shards, by name or through the latest pointer: each is read from the bucket,
    with its model from the config.json the run uploaded beside it."""
    transformers = pytest.importorskip("transformers")
    from flexbert.train.init_from import initialise_weights
    from flexbert.train.pretrain import TrainConfig

    first = read_weights(download(s3, "whole/ep0-ba3-rank0.pt", tmp_path / "ba3.pt"))[0]
    last = read_weights(download(s3, "sharded/ep0-ba6", tmp_path / "ba6"))[0]
    uris = [f"s3://{BUCKET}/whole/ep0-ba3-rank0.pt", f"s3://{BUCKET}/sharded/latest-rank0.pt"]
    assert cli_main(["average", *uris, "--out", str(tmp_path / "mean.pt")]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'mean.pt'}: the mean of {', '.join(uris)}")
    mean = read_weights(tmp_path / "mean.pt")[0]
    assert all(torch.allclose(mean[name], (first[name] + last[name]) / 2, atol=1e-7) for name in first)
    assert not torch.equal(
        first["model.embeddings.tok_embeddings.weight"], last["model.embeddings.tok_embeddings.weight"]
    )

    # --run picks them from the bucket its config.json names as save_folder.
    final = read_weights(download(s3, "whole/ep0-ba6-rank0.pt", tmp_path / "final.pt"))[0]
    run = str(whole["root"] / "tiny")
    assert cli_main(["average", "--run", run, "--last", "--out", str(tmp_path / "last.pt")]) == 0
    assert capsys.readouterr().out.startswith(
        f"{tmp_path / 'last.pt'}: the mean of s3://{BUCKET}/whole/ep0-ba6-rank0.pt\n"
    )
    assert all(torch.equal(tensor, final[name]) for name, tensor in read_weights(tmp_path / "last.pt")[0].items())

    assert cli_main(["export-hf", uris[1], str(tmp_path / "hf")]) == 0
    exported = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    assert all(torch.equal(tensor, last[name]) for name, tensor in exported.state_dict().items())

    # init_from tiles the bucket's checkpoint into a larger model.
    wider = {"model.hidden_size": 48, "model.intermediate_size": 64, "model.num_hidden_layers": 3}
    uri = f"s3://{BUCKET}/whole/latest-rank0.pt"
    config = TrainConfig.from_dict(tiny_recipe(corpus, tmp_path, init_from={"checkpoint": uri}, **wider))
    model = FlexBertForMaskedLM(config.model_config)
    initialise_weights(model, config.init_from, config.tokenizer)
    small_config = TrainConfig.from_dict(tiny_recipe(corpus, tmp_path)).model_config
    expected = tile_state_dict(final, small_config, config.model_config)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in expected.items())


def test_bad_object_storage_inputs_stop_in_one_line(s3, whole, corpus, tmp_path, capsys, monkeypatch):
    """A save_folder that cannot be used stops before training; a checkpoint URI that cannot be read
    stops export-hf, average and init_from; each with one line naming the URI."""
    from flexbert.train.pretrain import TrainConfig
    from flexbert.typed_config import ConfigError

    def error_line(argv: list[str]) -> str:
        assert cli_main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    def train(save_folder: str, **overrides) -> list[str]:
        recipe = tiny_recipe(corpus, tmp_path, save_folder=save_folder, **overrides)
        return ["train", str(write_recipe(tmp_path / "recipe.yaml", recipe))]

    # A bucket that is not there, before any training.
    assert error_line(train("s3://no-such-bucket/run")) == (
        "flexbert: error: save_folder: cannot use s3://no-such-bucket/run: An error occurred (NoSuchBucket) "
        "when calling the ListObjectsV2 operation: The specified bucket does not exist"
    )
    assert not (tmp_path / "tiny" / "metrics.jsonl").exists()
    # A folder holding a run's checkpoints, without autoresume: they would be overwritten.
    assert error_line(train(f"s3://{BUCKET}/whole")) == (
        f"flexbert: error: save_folder: s3://{BUCKET}/whole already holds checkpoints (ep0-ba3-rank0.pt, "
        "ep0-ba6-rank0.pt); set autoresume: true to continue that run, or give another save_folder"
    )
    # Reading a checkpoint: missing, an unsupported scheme, and no boto3.
    missing = f"s3://{BUCKET}/whole/ep0-ba9-rank0.pt"
    assert (
        error_line(["export-hf", missing, str(tmp_path / "hf")]) == f"flexbert: error: checkpoint not found: {missing}"
    )
    assert error_line(["average", "gs://bucket/a.pt", "--out", str(tmp_path / "a.pt")]).startswith(
        "flexbert: error: gs://bucket/a.pt: only s3:// checkpoints are read from object storage here"
    )
    with pytest.raises(ConfigError, match=rf"^init_from\.checkpoint: checkpoint not found: {re.escape(missing)}$"):
        TrainConfig.from_dict(tiny_recipe(corpus, tmp_path, init_from={"checkpoint": missing}))
    monkeypatch.setitem(sys.modules, "boto3", None)
    assert error_line(["export-hf", f"s3://{BUCKET}/whole/latest-rank0.pt", str(tmp_path / "hf")]) == (
        "flexbert: error: reading checkpoints from object storage needs boto3 (pip install boto3, or the "
        "training extra); or copy the checkpoint to a local path first"
    )
