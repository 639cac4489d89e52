"""Converting straight to S3 (a moto server on loopback) and streaming the result back."""

import importlib.util
import json
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TOKENIZER
from test_convert_to_mds import assert_same_samples, crash_on_unit, expected_ids, read_back, write_jsonl

from flexbert.cli import main as cli_main
from flexbert.data.convert import ConversionError, convert_to_mds

# streaming allocates shared-memory names per machine without locking: datasets built at the same
# moment in two test processes can collide, so every test that builds one runs in one xdist group.
pytestmark = pytest.mark.xdist_group("streaming")
BUCKET = "corpora"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint():
    """A moto S3 server on 127.0.0.1 for this module's tests; it is stopped however they end."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def point_at_server(patch: pytest.MonkeyPatch, endpoint: str) -> None:
    """The environment that points boto3, streaming and Composer at the server, with test credentials
    and none of the user's own."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "S3_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        patch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        patch.delenv(name, raising=False)


@pytest.fixture
def s3(endpoint, monkeypatch):
    """A boto3 client for the server holding BUCKET, with the environment pointing boto3 and streaming at it."""
    import boto3

    point_at_server(monkeypatch, endpoint)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    return client


def keys(client, prefix: str) -> list[str]:
    return [item["Key"] for item in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def command_line():
    spec = importlib.util.spec_from_file_location("convert_to_mds_cli", ROOT / "data_prep" / "convert_to_mds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_the_command_line_converts_to_s3_and_streaming_reads_it_back(s3, tmp_path, capsys):
    documents = [f"Remote document {index}: " + "words " * (index % 11) for index in range(80)]
    corpus = write_jsonl(tmp_path / "a.jsonl", documents)
    remote = f"s3://{BUCKET}/demo"

    status = command_line()(
        [
            "--input",
            str(corpus),
            "--output",
            remote,
            "--tokenizer",
            str(TOKENIZER),
            "--workers",
            "2",
            "--unit-size",
            "1KB",
            "--no-progress",
        ]
    )

    assert status == 0
    assert capsys.readouterr().out.startswith("flexbert prepare mds: 80 documents,")
    index = json.loads(s3.get_object(Bucket=BUCKET, Key="demo/index.json")["Body"].read())
    uploaded = {key.removeprefix("demo/") for key in keys(s3, "demo/")}
    assert {shard["zip_data"]["basename"] for shard in index["shards"]} <= uploaded
    assert_same_samples(read_back(remote, tmp_path / "cache"), expected_ids(documents))


def test_an_interrupted_upload_resumes_and_a_complete_one_is_kept(s3, tmp_path, monkeypatch):
    documents = [f"Document {index} " + "text " * (index % 7) for index in range(40)]
    corpus = write_jsonl(tmp_path / "a.jsonl", documents)
    remote, settings = f"s3://{BUCKET}/resumed", dict(workers=1, unit_size=256, progress=False)

    with monkeypatch.context() as patch:
        crash_on_unit(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            convert_to_mds([corpus], remote, TOKENIZER, **settings)
    assert "resumed/index.json" not in keys(s3, "resumed/")

    summary = convert_to_mds([corpus], remote, TOKENIZER, **settings)
    assert summary.resumed_units == 2
    assert_same_samples(read_back(remote, tmp_path / "cache"), expected_ids(documents))

    with pytest.raises(ConversionError, match="already holds a complete dataset"):
        convert_to_mds([corpus], remote, TOKENIZER, **settings)


def test_a_missing_bucket_is_one_clear_error(s3, tmp_path):
    corpus = write_jsonl(tmp_path / "a.jsonl", ["some text"])
    with pytest.raises(ConversionError, match="cannot use bucket 'no-such-bucket'"):
        convert_to_mds([corpus], "s3://no-such-bucket/demo", TOKENIZER, workers=1, progress=False)


def test_two_machines_convert_parts_to_s3_and_the_merge_reads_as_one_conversion(s3, tmp_path, capsys):
    # Two "nodes": two processes, each converting its part of the corpus straight to S3, at once.
    documents = [f"Shared corpus document {index}: " + "words " * (index % 13) for index in range(120)]
    corpus = write_jsonl(tmp_path / "a.jsonl", documents)
    remote = f"s3://{BUCKET}/parts"
    jobs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flexbert.cli",
                "prepare",
                "mds",
                "--input",
                str(corpus),
                "--output",
                remote,
                "--tokenizer",
                str(TOKENIZER),
                "--workers",
                "1",
                "--unit-size",
                "512",
                "--no-progress",
                "--part",
                f"{index}/2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    for job in jobs:
        out, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
        assert out.startswith("flexbert prepare mds: ")
    assert {key.split("/")[1] for key in keys(s3, "parts/")} == {"part-00000-of-00002", "part-00001-of-00002"}
    assert "parts/index.json" not in keys(s3, "parts/")  # nothing reads as whole before the merge

    assert cli_main(["prepare", "merge", remote, "--parts", "2"]) == 0
    assert capsys.readouterr().out.startswith("flexbert prepare merge: 2 parts, ")
    # The merged dataset holds exactly the documents of a one-job conversion, in the same order.
    one_job = tmp_path / "one-job"
    convert_to_mds([corpus], one_job, TOKENIZER, workers=1, unit_size=512, progress=False)
    merged = read_back(remote, tmp_path / "cache")
    assert [sample.tolist() for sample in merged] == [sample.tolist() for sample in read_back(one_job, tmp_path / "c1")]
    assert_same_samples(merged, expected_ids(documents))


def test_merging_before_every_part_is_complete_is_one_clear_error(tmp_path, capsys):
    documents = [f"Document {index} " + "text " * (index % 5) for index in range(30)]
    corpus = write_jsonl(tmp_path / "a.jsonl", documents)
    out = tmp_path / "out"
    convert_to_mds([corpus], out, TOKENIZER, workers=1, unit_size=256, progress=False, part=(1, 3))
    assert cli_main(["prepare", "merge", str(out), "--parts", "3"]) == 2
    assert capsys.readouterr().err == (
        f"flexbert: error: cannot merge {out}: 2 of 3 parts are not complete (part-00000-of-00003, "
        "part-00002-of-00003); finish their conversions first\n"
    )
    for index in (0, 2):
        convert_to_mds([corpus], out, TOKENIZER, workers=1, unit_size=256, progress=False, part=(index, 3))
    assert cli_main(["prepare", "merge", str(out), "--parts", "3"]) == 0
    assert_same_samples(read_back(out, tmp_path / "cache"), expected_ids(documents))
    with pytest.raises(ConversionError, match="part 5/3: the part must lie in 0 .. 2"):
        convert_to_mds([corpus], out, TOKENIZER, workers=1, progress=False, part=(5, 3))
