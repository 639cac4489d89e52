"""flexbert encode: a corpus embedded in unpadded, length-sorted batches gives each document the
vector that embedding it alone gives, in corpus order, in shards that a rerun skips."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TOKENIZER
from test_convert_to_mds import make_input
from test_export_st import MAX_SEQ_LEN, finetune_run, flexbert_vectors, mlm_sources, pooled

import flexbert.core.encode
from flexbert.cli import main as cli_main
from flexbert.core.embedders import load_embedder
from flexbert.core.embedding import length_sorted_batches
from flexbert.core.encode import encode_corpus, open_corpus
from flexbert.core.tokenizer import load_tokenizer
from flexbert.data.convert import convert_to_mds

pytestmark = pytest.mark.xdist_group("streaming")  # converts to MDS: see test_remote_streaming.py

# Lengths from a few tokens to past MAX_SEQ_LEN, shuffled so that sorting them matters.
DOCUMENTS = [
    " ".join(f"word{index}-{k}" for k in range(length))
    for index, length in enumerate([3, 60, 1, 25, 200, 7, 90, 12, 40, 2, 33])
]
TRUNCATED = sum(len(ids) > MAX_SEQ_LEN - 2 for ids in load_tokenizer(TOKENIZER).encode_batch(DOCUMENTS))


@pytest.fixture(scope="module")
def embedding_run(tmp_path_factory):
    torch.manual_seed(0)
    checkpoint, model = finetune_run(tmp_path_factory.mktemp("runs"), "mean")
    return checkpoint, model, flexbert_vectors(model, DOCUMENTS, MAX_SEQ_LEN)


def read_shards(out, fmt: str = "npy") -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of every shard, in shard order."""
    if fmt == "parquet":
        tables = [pq.read_table(path) for path in sorted(out.glob("part-*.parquet"))]
        ids = np.concatenate([table["id"].to_numpy() for table in tables])
        vectors = np.concatenate([np.stack(table["embedding"].to_numpy(zero_copy_only=False)) for table in tables])
        return ids, vectors
    names = sorted(path for path in out.glob("part-*.npy") if not path.name.endswith(".ids.npy"))
    ids = np.concatenate([np.load(path.with_suffix(".ids.npy")) for path in names])
    return ids, np.concatenate([np.load(path) for path in names])


def test_length_sorted_batches_cover_each_document_once_within_the_budget():
    lengths = np.array([5, 50, 3, 120, 40, 40, 8])
    batches = length_sorted_batches(lengths, max_tokens=100)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    assert [batch.tolist() for batch in batches] == [[3], [1, 4], [5, 6, 0, 2]]  # longest first; 120 alone
    assert length_sorted_batches(np.array([], dtype=int), 100) == []


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_batched_vectors_equal_each_document_embedded_alone(tmp_path, embedding_run, fmt):
    checkpoint, _, expected = embedding_run
    corpus = make_input("jsonl", tmp_path, DOCUMENTS)
    out = tmp_path / "vectors"
    # Shards of 4 and a 150-token budget: batches of several documents, and a document cut alone.
    argv = ["encode", checkpoint, corpus, out, "--format", fmt, "--shard-size", "4", "--max-tokens-per-batch", "150"]
    assert cli_main([str(arg) for arg in argv]) == 0

    ids, vectors = read_shards(out, fmt)
    assert ids.tolist() == list(range(len(DOCUMENTS)))
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=0)
    assert len(list(out.glob(f"part-?????.{fmt}"))) == 3 and not list(out.glob(".*"))


@pytest.mark.parametrize("kind", ["text folder", "parquet", "saved dataset", "mds"])
def test_each_input_format_gives_the_same_vectors(tmp_path, embedding_run, kind):
    checkpoint, _, expected = embedding_run
    if kind == "mds":  # flexbert prepare mds's output: token ids without special tokens
        source = make_input("jsonl", tmp_path, DOCUMENTS)
        corpus = tmp_path / "mds"
        convert_to_mds([source], corpus, TOKENIZER, workers=1, unit_size=200, progress=False)
        assert len(json.loads((corpus / "index.json").read_text())["shards"]) > 1
    else:
        corpus = make_input(kind, tmp_path, DOCUMENTS)
    summary = encode_corpus(load_embedder(checkpoint), open_corpus(corpus), tmp_path / "out")

    assert (summary.documents, summary.truncated) == (len(DOCUMENTS), TRUNCATED)
    ids, vectors = read_shards(tmp_path / "out")
    assert ids.tolist() == list(range(len(DOCUMENTS)))
    np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=0)


def test_a_rerun_skips_finished_shards_and_completes_an_interrupted_one(tmp_path, embedding_run, monkeypatch):
    checkpoint, _, expected = embedding_run
    corpus, out = make_input("jsonl", tmp_path, DOCUMENTS), tmp_path / "out"

    def run():
        return encode_corpus(load_embedder(checkpoint), open_corpus(corpus), out, shard_size=3, progress=False)

    # Killed while the third shard's vectors are being put in place: its ids are written, its
    # vectors are not, and the file being written is gone.
    renames = []

    def interrupted_at_the_seventh_rename(source, target):  # encode.json, then two files per shard
        renames.append(target)
        if len(renames) == 7:
            raise KeyboardInterrupt
        os.rename(source, target)

    monkeypatch.setattr(flexbert.core.encode.os, "replace", interrupted_at_the_seventh_rename)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.undo()
    assert renames[-1] == out / "part-00002.npy"
    assert sorted(path.name for path in out.iterdir()) == [
        "encode.json",
        *(f"part-0000{shard}.{kind}" for shard in range(2) for kind in ("ids.npy", "npy")),
        "part-00002.ids.npy",
    ]
    finished = {path.name: path.stat().st_mtime_ns for path in out.glob("part-0000[01].*")}

    summary = run()
    assert (summary.shards_skipped, summary.shards_written) == (2, 2)
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished  # untouched
    ids, vectors = read_shards(out)
    assert ids.tolist() == list(range(len(DOCUMENTS)))
    np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=0)

    again = run()
    assert (again.shards_skipped, again.shards_written, again.tokens) == (4, 0, 0)


def test_a_pretrained_encoder_embeds_with_the_pooling_asked_for(tmp_path):
    mlm, sources = mlm_sources(tmp_path)
    corpus = make_input("jsonl", tmp_path, DOCUMENTS[:4])
    out = tmp_path / "out"
    argv = ["encode", sources["hf"], corpus, out, "--pooling", "cls", "--max-seq-len", "64"]
    assert cli_main([str(arg) for arg in argv]) == 0

    expected = torch.nn.functional.normalize(torch.from_numpy(pooled(mlm, DOCUMENTS[:4], "cls", 64)), dim=-1)
    np.testing.assert_allclose(read_shards(out)[1], expected.numpy(), atol=1e-5, rtol=0)


def test_bad_input_gives_one_clear_error(tmp_path, embedding_run, capsys):
    checkpoint, _, _ = embedding_run
    _, sources = mlm_sources(tmp_path)
    corpus = make_input("jsonl", tmp_path, DOCUMENTS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n{"text": "fine again"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.csv").write_text("a,b\n")
    encoded = tmp_path / "encoded"
    assert cli_main(["encode", str(checkpoint), str(corpus), str(encoded), "--shard-size", "4"]) == 0
    capsys.readouterr()
    cases = [
        ([checkpoint, tmp_path / "missing.jsonl"], "missing.jsonl does not exist"),
        ([tmp_path / "missing.pt", corpus], "missing.pt does not exist"),
        ([checkpoint, tmp_path / "other"], "no input files under"),
        ([checkpoint, bad], "invalid_json: 1, first in"),
        ([checkpoint, empty], "holds no documents"),
        ([sources["checkpoint"], corpus], "choose one with --pooling"),
        ([sources["checkpoint"], corpus, "--pooling", "mean"], "add --tokenizer DIR"),
        ([checkpoint, corpus, "--max-seq-len", "4096"], "--max-seq-len=4096"),
        ([checkpoint, corpus, "--text-field", "body"], "missing_field"),
    ]
    for index, (argv, message) in enumerate(cases):
        code = cli_main(["encode", *map(str, argv), str(tmp_path / f"out{index}"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.startswith("flexbert: error: ") and err.count("\n") == 1, err
        assert message in err, (message, err)

    # An output folder holds one encoding: other settings, or other files, are refused.
    for argv, message in [
        (["--shard-size", "5"], "other shard_size"),
        (["--format", "parquet"], "other format, shard_size"),
    ]:
        code = cli_main(["encode", str(checkpoint), str(corpus), str(encoded), *argv, "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
    code = cli_main(["encode", str(checkpoint), str(corpus), str(tmp_path / "other")])
    assert code == 2 and "holds no encode.json" in capsys.readouterr().err
