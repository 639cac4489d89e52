"""The data order every pretraining run records: the binary record (torn by a killed writer, resumed,
superseded), and ``flexbert data-order``, checked against the record read independently, the MDS
index.json files and the documents' tokens as the test corpus made them."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TOKENIZER
from data_helpers import document_tokens, random_lengths
from train_helpers import tiny_recipe, write_corpus

from flexbert.cli import main as cli_main
from flexbert.core.tokenizer import load_tokenizer
from flexbert.errors import MissingFileError, RunFolderError
from flexbert.train.data_order import (
    DataOrderWriter,
    data_files,
    read_data_order,
    recorded_steps,
    step_record,
    trained_pieces,
)
from flexbert.train.pretrain import TrainConfig

pytestmark = pytest.mark.xdist_group("streaming")  # trainings never share the 2 cores

# As train_helpers.write_corpus writes them: stream name -> (token seed, document lengths); web takes
# two shards.
CORPUS = {"web": (0, random_lengths(400, seed=1, high=300)), "code": (1, random_lengths(100, seed=2, high=300))}


def keys(step: int, pieces: int = 3) -> np.ndarray:
    """Piece keys that say which step they belong to."""
    return np.array([[i % 2, 1000 * step + i, 7 * i, 7 * i + 5] for i in range(pieces)], dtype=np.int64)


def write(run_dir: Path, steps, rank: int = 0, seed: int = 11) -> None:
    writer = DataOrderWriter(run_dir / "data_order", rank)
    for step in steps:
        writer.append(step, seed, keys(step))
    writer.close()


def expected(steps, seed: int = 11) -> list[dict]:
    return [{"step": step, "pieces": keys(step).tolist(), "mask_seed": seed} for step in steps]


# --- the record ----------------------------------------------------------------------------------------


def test_records_read_back_and_a_resumed_run_supersedes_the_steps_it_trains_again(tmp_path):
    write(tmp_path, range(5))
    write(tmp_path, range(3, 7))  # resumed from the checkpoint after step 2
    assert recorded_steps(tmp_path) == {0: [0, 1, 2, 3, 4, 3, 4, 5, 6]}
    assert read_data_order(tmp_path) == {0: expected(range(7))}
    assert trained_pieces(tmp_path) == {tuple(piece): 1 for step in range(7) for piece in keys(step).tolist()}
    # The index finds one step without reading the others, and finds the one that was trained last.
    record = step_record(tmp_path, 4)[0]
    assert (record.step, record.mask_seed) == (4, 11)
    assert np.array_equal(np.stack([record.pieces[name] for name in record.pieces.dtype.names], 1), keys(4))
    # A resumption that never got as far as the killed run: the killed run's later steps are dropped.
    write(tmp_path, [2])
    assert [row["step"] for row in read_data_order(tmp_path)[0]] == [0, 1, 2]
    with pytest.raises(RunFolderError, match=r"step 5 is not in the data order of .*: it records steps 0-2$"):
        step_record(tmp_path, 5)


@pytest.mark.parametrize("cut", [1, 20, 32, 40, -1])  # in the header, at its end, in the pieces, the last byte
def test_a_record_torn_by_a_killed_writer_is_dropped_and_the_resumed_run_appends_after_the_last_whole_one(
    tmp_path, cut
):
    write(tmp_path, range(3))
    data, index = data_files(tmp_path / "data_order", 0)
    whole = data.stat().st_size
    write(tmp_path, [3])
    torn = data.read_bytes()[: whole + cut % (data.stat().st_size - whole)]
    data.write_bytes(torn)  # the kill came while step 3's record was being written, before its index entry
    index.write_bytes(index.read_bytes()[:-16])
    with pytest.warns(UserWarning, match=r"rank0.bin: dropped its last \d+ bytes, a record cut short by a killed run"):
        assert read_data_order(tmp_path) == {0: expected(range(3))}
    with pytest.warns(UserWarning, match="cut short"):
        assert step_record(tmp_path, 2)[0].step == 2

    write(tmp_path, [3, 4])  # the resumed run: its records follow the last whole one
    assert data.stat().st_size > whole
    assert read_data_order(tmp_path) == {0: expected(range(5))}
    assert step_record(tmp_path, 4)[0].step == 4


def test_a_damaged_record_and_a_torn_index_entry_are_found(tmp_path):
    write(tmp_path, range(3))
    data, index = data_files(tmp_path / "data_order", 0)
    damaged = bytearray(data.read_bytes())
    damaged[-3] ^= 0xFF  # the last record is whole in length, but its CRC fails
    data.write_bytes(bytes(damaged))
    index.write_bytes(index.read_bytes()[:-5])  # and its index entry was cut short
    with pytest.warns(UserWarning, match="cut short"):
        assert [row["step"] for row in read_data_order(tmp_path)[0]] == [0, 1]
    write(tmp_path, [2, 3])
    assert read_data_order(tmp_path) == {0: expected(range(4))}
    assert step_record(tmp_path, 3)[0].step == 3 and index.stat().st_size == 4 * 16


def test_reading_a_run_without_a_record_says_so(tmp_path):
    with pytest.raises(MissingFileError, match="no data order recorded; .* data_order: {record: false}"):
        read_data_order(tmp_path)


# --- a training run, and flexbert data-order -----------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from flexbert.train.pretrain import build_trainer

    root = tmp_path_factory.mktemp("data_order")
    corpus = write_corpus(root / "corpus", {name: lengths for name, (_, lengths) in CORPUS.items()})
    # Shuffled, so that a step holds documents of both streams.
    recipe = tiny_recipe(corpus, root, max_duration="6ba", save_interval="1000ba", **{"train_loader.shuffle": True})
    trainer = build_trainer(TrainConfig.from_dict(recipe), recipe)  # the record is on by default
    trainer.fit()
    trainer.close()
    return root / "tiny"


def data_order(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli_main(["data-order", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def table(out: str) -> list[list[str]]:
    """The rows of the printed table, split into their columns (none of which holds a space)."""
    return [line.split() for line in out.splitlines()[3:] if line[:1].isdigit()]


def shard_of(stream_dir: Path, in_stream: int) -> tuple[str, int]:
    """The shard file and the index in it of a stream's sample, from its index.json."""
    for shard in json.loads((stream_dir / "index.json").read_text())["shards"]:
        if in_stream < shard["samples"]:
            return (shard["zip_data"] or shard["raw_data"])["basename"], in_stream
        in_stream -= shard["samples"]
    raise AssertionError("beyond the stream")


def test_the_record_is_on_by_default_and_data_order_prints_a_steps_pieces(run, capsys):
    config = json.loads((run / "config.json").read_text())
    names, seed = list(config["train_loader"]["streams"]), config["train_loader"]["masking"]["seed"]
    corpus = run.parent / "corpus"
    first_of = {"web": 0, "code": len(CORPUS["web"][1])}  # the dataset numbers samples stream by stream
    seen = set()
    for recorded in read_data_order(run)[0]:
        step = recorded["step"]
        assert recorded["mask_seed"] == seed
        status, out, err = data_order(capsys, str(run), "--step", str(step))
        assert status == 0 and err == ""
        lines = out.splitlines()
        assert lines[0] == (
            f"{run}, step {step}: {len(recorded['pieces'])} pieces on 1 rank, mask seed {seed}, mask rate 0.3"
        )
        assert lines[1] == f"streams: web = {corpus / 'web'}, code = {corpus / 'code'}"
        rows = table(out)
        assert len(rows) == len(recorded["pieces"])
        for row, (stream, sample, start, end) in zip(rows, recorded["pieces"]):
            name = names[stream]
            assert row[0] == "0" and row[1] == name and row[5] == str(sample) and row[6] == f"{start}:{end}"
            in_stream = sample - first_of[name]
            assert row[3] == str(in_stream) and (row[2], int(row[4])) == shard_of(corpus / name, in_stream)
            seen.add((name, row[2]))
    assert recorded["step"] == 5
    # Both streams, and both of web's shards, were met (and told apart).
    assert {name for name, _ in seen} == {"web", "code"} and len(seen) == 3, seen

    recorded = read_data_order(run)[0][0]
    status, out, _ = data_order(capsys, str(run), "--step", "0", "--rank", "0", "--text")
    assert status == 0
    decode = load_tokenizer(TOKENIZER).tokenizer.decode
    body = out.splitlines()[3:]
    for row, (stream, sample, start, end) in zip(table(out), recorded["pieces"]):
        seed_of, lengths = CORPUS[names[stream]]
        in_stream = sample - first_of[names[stream]]
        tokens = document_tokens(seed_of, in_stream, lengths[in_stream], vocab=400)[start:end]
        text = decode(tokens.tolist(), skip_special_tokens=False)
        at = next(i for i, line in enumerate(body) if line.split() == row)
        assert body[at + 1 : at + 1 + len(text.splitlines() or [""])] == [
            "    " + line for line in text.splitlines() or [""]
        ]


def test_data_order_says_in_one_line_what_it_cannot_show(run, tmp_path, capsys):
    status, out, err = data_order(capsys, str(run), "--step", "6")
    assert (status, out) == (2, "")
    assert err == f"flexbert: error: step 6 is not in the data order of {run}: it records steps 0-5\n"
    status, _, err = data_order(capsys, str(tmp_path / "nowhere"), "--step", "0")
    assert (status, err) == (2, f"flexbert: error: run folder not found: {tmp_path / 'nowhere'}\n")
    status, _, err = data_order(capsys, str(run), "--step", "0", "--rank", "1")
    assert status == 2 and err.startswith("flexbert: error: rank 1 has no record of step 0")

    # A copy of the run whose data is gone: the pieces still print, the shards and text cannot.
    moved = tmp_path / "tiny"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((moved / "config.json").read_text())
    config["train_loader"]["streams"]["web"]["local"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    status, out, err = data_order(capsys, str(moved), "--step", "0", "--text")
    assert status == 1
    assert len(table(out)) == len(read_data_order(run)[0][0]["pieces"])
    assert all(row[2:5] == ["?", "?", "?"] for row in table(out))  # code's samples come after web's
    notes = err.splitlines()
    gone = tmp_path / "gone"
    problem = f"no MDS dataset at {gone} (index.json missing): moved or deleted?"
    assert notes == [
        f"flexbert: note: shards of stream 'web' unknown: {problem}",
        f"flexbert: note: cannot show the text: stream 'web': {problem}",
    ]

    (moved / "data_order" / "rank0.bin").unlink()
    status, _, err = data_order(capsys, str(moved), "--step", "0")
    assert status == 2 and err.startswith(f"flexbert: error: {moved / 'data_order'}: no data order recorded")


def test_data_order_record_false_writes_none(tmp_path):
    from flexbert.train.pretrain import build_trainer

    corpus = write_corpus(tmp_path / "corpus")
    recipe = tiny_recipe(corpus, tmp_path, max_duration="1ba", save_interval="1000ba", **{"data_order.record": False})
    trainer = build_trainer(TrainConfig.from_dict(recipe), recipe)
    trainer.fit()
    trainer.close()
    assert (tmp_path / "tiny" / "metrics.jsonl").is_file() and not (tmp_path / "tiny" / "data_order").exists()
