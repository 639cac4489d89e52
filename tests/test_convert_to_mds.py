"""Raw corpora to pre-tokenized MDS: every input kind, bad records, long documents, resuming, refusals."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import ROOT, TOKENIZER

from flexbert.core.sources import BadRecords, SourceError, find_inputs, plan_slices, read_slice
from flexbert.core.tokenizer import TokenizerError, load_tokenizer
from flexbert.data import convert
from flexbert.data.convert import ConversionError, convert_to_mds
from tokenizers import Tokenizer, models, pre_tokenizers

# Reading back builds streaming datasets; see test_remote_streaming.py for why they share a group.
pytestmark = pytest.mark.xdist_group("streaming")


DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé text, 日本語のテキスト, and emoji 🙂 survive tokenization.",
    "def f(x):\n    return x ** 2  # code is text too\n",
    "A second paragraph.\n\nWith a blank line in between.",
    "Short.",
]


def read_back(out: Path | str, cache: Path) -> list[np.ndarray]:
    """Every sample's input_ids, in order, as the training loader's StreamingDataset sees them."""
    # Imported here: streaming takes seconds to import, which tests that never read can skip.
    from streaming import StreamingDataset

    from flexbert.data.shm import clean_stale_streaming_memory

    clean_stale_streaming_memory()  # unlike streaming's own cleaner, safe beside live datasets
    # A local output serves as the "remote" too, so that reading never writes into it.
    dataset = StreamingDataset(remote=str(out), local=str(cache), batch_size=1, shuffle=False)
    return [dataset[index]["input_ids"] for index in range(dataset.num_samples)]


def expected_ids(documents: list[str], tokenizer_dir: Path = TOKENIZER) -> list[list[int]]:
    return [ids for ids in load_tokenizer(tokenizer_dir).encode_batch(documents) if ids]


def assert_same_samples(samples: list[np.ndarray], expected: list[list[int]], dtype: str = "uint16") -> None:
    assert len(samples) == len(expected)
    for sample, ids in zip(samples, expected):
        assert sample.dtype == np.dtype(dtype)
        assert sample.tolist() == ids


def assert_tokens_counted_exactly(out: Path, samples: list[np.ndarray]) -> None:
    """What train_loader.temperature weighs the stream by: its tokens, read from its shards' tables."""
    from flexbert.data.streams import stream_tokens  # (imports streaming, as read_back does)

    assert stream_tokens("train_loader.streams.out", out) == sum(len(sample) for sample in samples)


def write_jsonl(path: Path, documents: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    return path


def make_input(kind: str, directory: Path, documents: list[str]) -> Path:
    """``documents`` stored as one input of ``kind``, in order."""
    lines = "".join(json.dumps({"id": index, "text": text}) + "\n" for index, text in enumerate(documents)).encode()
    if kind == "text folder":
        folder = directory / "corpus"
        for index, text in enumerate(documents):  # nested, and named so that sorting restores the order
            path = folder / f"part{index // 2}" / f"{index:03d}{'.md' if index % 2 else '.txt'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        (folder / "part0" / "notes.csv").write_text("ignored,because,not text\n")
        (folder / ".hidden.txt").write_text("hidden entries are skipped")
        return folder
    if kind == "jsonl":
        (directory / "corpus.jsonl").write_bytes(lines)
        return directory / "corpus.jsonl"
    if kind == "jsonl.gz":
        (directory / "corpus.jsonl.gz").write_bytes(gzip.compress(lines))
        return directory / "corpus.jsonl.gz"
    if kind == "jsonl.zst":
        (directory / "corpus.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
        return directory / "corpus.jsonl.zst"
    if kind == "parquet":
        table = pa.table({"id": list(range(len(documents))), "text": documents})
        pq.write_table(table, directory / "corpus.parquet", row_group_size=2)
        return directory / "corpus.parquet"
    if kind == "saved dataset":
        import datasets  # imported here: it takes seconds

        datasets.Dataset.from_dict({"id": list(range(len(documents))), "text": documents}).save_to_disk(
            directory / "saved"
        )
        return directory / "saved"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["text folder", "jsonl", "jsonl.gz", "jsonl.zst", "parquet", "saved dataset"])
def test_each_input_kind_converts_to_the_tokenizers_ids(tmp_path, kind):
    source = make_input(kind, tmp_path, DOCUMENTS)
    # Units of a few bytes cut every input that can be cut into several units.
    summary = convert_to_mds([source], tmp_path / "out", TOKENIZER, workers=1, unit_size=64, progress=False)

    assert summary.total.documents == len(DOCUMENTS) and not summary.total.bad.counts
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert {
        (tuple(shard["column_names"]), tuple(shard["column_encodings"]), shard["compression"])
        for shard in index["shards"]
    } == {(("input_ids",), ("ndarray:uint16",), "zstd")}
    assert_same_samples(read_back(tmp_path / "out", tmp_path / "cache"), expected_ids(DOCUMENTS))


def test_plain_json_lines_cut_anywhere_are_read_once_each(tmp_path):
    documents = [f"line {index} " + "é" * index for index in range(12)]
    path = write_jsonl(tmp_path / "a.jsonl", documents)
    for unit_bytes in (1, 2, 3, 7, 16, 50, 10_000):
        bad = BadRecords()
        pieces = plan_slices(find_inputs([path]), "text", unit_bytes)
        read = [text for piece in pieces for text, _ in read_slice(piece, "text", bad)]
        assert read == documents and not bad.counts, unit_bytes


def test_long_documents_stay_whole_and_empty_ones_are_skipped(tmp_path):
    long_document = " ".join(f"word{index}" for index in range(30_000))
    documents = ["", long_document, "after the long one"]
    summary = convert_to_mds(
        [write_jsonl(tmp_path / "a.jsonl", documents)], tmp_path / "out", TOKENIZER, workers=1, progress=False
    )

    samples = read_back(tmp_path / "out", tmp_path / "cache")
    assert summary.total.empty == 1 and summary.total.documents == 2
    assert len(samples[0]) > 30_000  # far past any training sequence length
    assert_same_samples(samples, expected_ids(documents))
    assert_tokens_counted_exactly(tmp_path / "out", samples)


def test_a_vocabulary_past_uint16_is_stored_as_uint32(tmp_path):
    words = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"] + [f"w{index}" for index in range(70_000)]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "wide").mkdir()
    tokenizer.save(str(tmp_path / "wide" / "tokenizer.json"))
    documents = ["w1 w69999 w65536", "w65535 unknown w2"]

    convert_to_mds(
        [write_jsonl(tmp_path / "a.jsonl", documents)], tmp_path / "out", tmp_path / "wide", workers=1, progress=False
    )

    samples = read_back(tmp_path / "out", tmp_path / "cache")
    assert_same_samples(samples, [[6, 70004, 65541], [65540, 0, 7]], dtype="uint32")
    assert_tokens_counted_exactly(tmp_path / "out", samples)


def corpus_with_bad_records(path: Path, good: int) -> Path:
    lines = [json.dumps({"text": f"document {index}"}).encode() for index in range(good)]
    lines += [
        b"{not json",
        b'{"title": "no text"}',
        b'["not", "an", "object"]',
        b'{"text": 5}',
        b'{"text": null}',
        b'{"text": "\xff\xfe not utf-8"}',
        b'{"text": "\\ud800 a lone surrogate"}',
        b"",
        b"   ",
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_records_are_counted_and_tolerated_up_to_the_limit(tmp_path):
    corpus = corpus_with_bad_records(tmp_path / "a.jsonl", good=1000)

    summary = convert_to_mds([corpus], tmp_path / "out", TOKENIZER, workers=1, max_bad_fraction=0.01, progress=False)

    assert summary.total.documents == 1000
    assert summary.total.bad.counts == {"invalid_json": 1, "missing_field": 2, "not_a_string": 2, "invalid_utf8": 2}
    assert "bad lines: 7 (invalid_json 1, invalid_utf8 2, missing_field 2, not_a_string 2)" in summary.line()
    assert len(read_back(tmp_path / "out", tmp_path / "cache")) == 1000


def test_too_many_bad_records_fail_and_leave_no_output(tmp_path):
    corpus = corpus_with_bad_records(tmp_path / "a.jsonl", good=1000)

    expected = r"7 of 1,007 records are bad \(invalid_json: 1, .*--max-bad-fraction 0.001"
    with pytest.raises(ConversionError, match=expected):
        convert_to_mds([corpus], tmp_path / "out", TOKENIZER, workers=1, unit_size=2000, progress=False)
    assert not (tmp_path / "out").exists()


def crash_on_unit(monkeypatch, number: int) -> None:
    """Make the conversion die like a killed job while writing its ``number``-th unit (1-based)."""
    write_unit, calls = convert._write_unit, []

    def crashing(job, tokenizer, advance):
        calls.append(job.name)
        if len(calls) == number:
            if "://" not in job.output:
                Path(job.output, job.name).mkdir(parents=True)
                Path(job.output, job.name, "shard.00000.mds.zstd").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        return write_unit(job, tokenizer, advance)

    monkeypatch.setattr(convert, "_write_unit", crashing)


def shard_files(out: Path) -> dict[str, bytes]:
    return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.glob("unit-*/*"))}


def test_an_interrupted_conversion_resumes_to_the_same_output(tmp_path, monkeypatch):
    documents = [f"Document number {index}: " + "some words " * (index % 13) for index in range(60)]
    corpus = write_jsonl(tmp_path / "a.jsonl", documents)
    settings = dict(workers=1, unit_size=256, progress=False)
    reference = convert_to_mds([corpus], tmp_path / "reference", TOKENIZER, **settings)
    assert reference.units > 4

    with monkeypatch.context() as patch:
        crash_on_unit(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            convert_to_mds([corpus], tmp_path / "out", TOKENIZER, **settings)
    assert not (tmp_path / "out" / "index.json").exists()
    assert len(list((tmp_path / "out" / "conversion").glob("unit-*.json"))) == 2

    resumed = convert_to_mds([corpus], tmp_path / "out", TOKENIZER, **settings)

    assert resumed.resumed_units == 2 and resumed.total == reference.total
    assert (tmp_path / "out" / "index.json").read_text() == (tmp_path / "reference" / "index.json").read_text()
    assert shard_files(tmp_path / "out") == shard_files(tmp_path / "reference")
    assert_same_samples(read_back(tmp_path / "out", tmp_path / "cache"), expected_ids(documents))


def test_a_changed_corpus_restarts_instead_of_resuming(tmp_path, monkeypatch):
    corpus = write_jsonl(tmp_path / "a.jsonl", [f"document {index}" for index in range(40)])
    settings = dict(workers=1, unit_size=128, progress=False)
    with monkeypatch.context() as patch:
        crash_on_unit(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            convert_to_mds([corpus], tmp_path / "out", TOKENIZER, **settings)

    documents = [f"changed document {index}" for index in range(50)]
    summary = convert_to_mds([write_jsonl(corpus, documents)], tmp_path / "out", TOKENIZER, **settings)

    assert summary.resumed_units == 0
    assert_same_samples(read_back(tmp_path / "out", tmp_path / "cache"), expected_ids(documents))


def test_workers_do_not_change_the_output(tmp_path):
    documents = [f"Document {index}. " + "text " * (index % 17) for index in range(300)]
    corpus = write_jsonl(tmp_path / "a.jsonl", documents)
    for workers in (1, 2):
        convert_to_mds([corpus], tmp_path / f"out{workers}", TOKENIZER, workers=workers, unit_size=1024, progress=False)

    assert (tmp_path / "out1" / "index.json").read_text() == (tmp_path / "out2" / "index.json").read_text()
    assert shard_files(tmp_path / "out1") == shard_files(tmp_path / "out2")


def test_a_complete_output_is_kept_unless_overwrite_is_asked(tmp_path):
    corpus = write_jsonl(tmp_path / "a.jsonl", DOCUMENTS)
    convert_to_mds([corpus], tmp_path / "out", TOKENIZER, workers=1, progress=False)
    before = shard_files(tmp_path / "out")

    with pytest.raises(ConversionError, match="already holds a complete dataset.*--overwrite"):
        convert_to_mds([write_jsonl(corpus, DOCUMENTS[:2])], tmp_path / "out", TOKENIZER, workers=1, progress=False)
    assert shard_files(tmp_path / "out") == before

    convert_to_mds([corpus], tmp_path / "out", TOKENIZER, workers=1, overwrite=True, progress=False)
    assert_same_samples(read_back(tmp_path / "out", tmp_path / "cache"), expected_ids(DOCUMENTS[:2]))


def test_a_folder_holding_something_else_is_never_written_into(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    corpus = write_jsonl(tmp_path / "a.jsonl", DOCUMENTS)

    with pytest.raises(ConversionError, match="not empty and holds no dataset"):
        convert_to_mds([corpus], tmp_path / "out", TOKENIZER, workers=1, overwrite=True, progress=False)
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["thesis.tex"]


def parquet_without_text(path: Path) -> Path:
    pq.write_table(pa.table({"content": ["a", "b"]}), path)
    return path


@pytest.mark.parametrize(
    "problem, error, message",
    [
        ("missing input", SourceError, "input not found: .*missing.jsonl does not exist"),
        ("unknown tokenizer", TokenizerError, "tokenizer not found"),
        ("empty corpus", ConversionError, "empty corpus"),
        ("no text column", SourceError, "no column 'text' \\(columns: content\\)"),
        ("no input files", SourceError, "no input files under"),
        ("truncated archive", SourceError, "corrupt or truncated archive"),
    ],
)
def test_a_bad_request_is_one_clear_error_and_writes_nothing(tmp_path, problem, error, message):
    inputs, tokenizer = [write_jsonl(tmp_path / "a.jsonl", DOCUMENTS)], TOKENIZER
    if problem == "missing input":
        inputs.append(tmp_path / "missing.jsonl")
    elif problem == "unknown tokenizer":
        tokenizer = tmp_path / "no-such-tokenizer"
    elif problem == "empty corpus":
        inputs = [write_jsonl(tmp_path / "a.jsonl", ["", ""])]
    elif problem == "no text column":
        inputs = [parquet_without_text(tmp_path / "a.parquet")]
    elif problem == "no input files":
        (tmp_path / "empty").mkdir()
        inputs = [tmp_path / "empty"]
    elif problem == "truncated archive":  # found only while converting, after the first units are written
        whole = make_input("jsonl.zst", tmp_path, [f"document {index}" for index in range(1000)])
        inputs.append(whole.with_name("cut.jsonl.zst"))
        inputs[-1].write_bytes(whole.read_bytes()[:-20])

    with pytest.raises(error, match=message):
        convert_to_mds(inputs, tmp_path / "out", tokenizer, workers=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_the_command_line_reports_errors_in_one_line_with_status_2(tmp_path):
    missing = tmp_path / "missing.jsonl"
    command = [
        sys.executable,
        str(ROOT / "data_prep" / "convert_to_mds.py"),
        "--input",
        str(missing),
        "--output",
        str(tmp_path / "out"),
        "--tokenizer",
        str(TOKENIZER),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)

    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"flexbert: error: input not found: {missing} does not exist"]

    help_text = subprocess.run(command[:2] + ["--help"], capture_output=True, text=True, cwd=ROOT, timeout=120).stdout
    for option in (
        "--input",
        "--output",
        "--tokenizer",
        "--text-field",
        "--workers",
        "--max-bad-fraction",
        "--overwrite",
        "--shard-size",
        "--unit-size",
        "ndarray:uint16",
        "s3://",
    ):
        assert option in help_text
