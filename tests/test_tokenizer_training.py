"""Tokenizer training: ModernBERT's vocabulary layout and template, every input format, clean failures."""

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import TOKENIZER

from flexbert.core.atomic_output import OutputExistsError
from flexbert.core.sources import SourceError
from flexbert.core.tokenizer import TokenizerError, load_tokenizer
from flexbert.data import tokenizer_training
from flexbert.data.tokenizer_training import SPECIAL_TOKENS, TokenizerTrainingError, padded_vocab_size, train_tokenizer
from tokenizers import Tokenizer, models

REPO = Path(__file__).resolve().parents[1]


def make_texts(count: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    return [" ".join(rng.choice(words) for _ in range(30)) + f". Line {index}!" for index in range(count)]


TEXTS = make_texts()


def write_jsonl_lines(file: Path, texts: list[str], field: str = "text") -> None:
    lines = "".join(json.dumps({"id": index, field: text}) + "\n" for index, text in enumerate(texts))
    if file.name.endswith(".gz"):
        file.write_bytes(gzip.compress(lines.encode()))
    elif file.name.endswith(".zst"):
        file.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    else:
        file.write_text(lines)


def write_corpus(directory: Path, kind: str, texts: list[str] = TEXTS) -> Path:
    """``texts`` stored as one input of ``kind``; returns the path to pass to training."""
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "txt-folder":
        for index, text in enumerate(texts):
            (directory / f"doc-{index:04d}.txt").write_text(text)
        return directory
    file = directory / f"corpus.{kind}"
    if kind == "parquet":
        pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), file)
    else:
        write_jsonl_lines(file, texts)
    return file


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The summary of a 512-token tokenizer trained once on TEXTS (as JSON lines)."""
    root = tmp_path_factory.mktemp("trained")
    return train_tokenizer([write_corpus(root / "in", "jsonl")], root / "out", vocab_size=500, show_progress=False)


def test_vocab_size_rounds_up_to_a_multiple_of_64():
    assert [padded_vocab_size(n) for n in (262, 320, 321, 50280, 50368)] == [320, 320, 384, 50304, 50368]
    with pytest.raises(TokenizerTrainingError, match="too small: it must exceed 261"):
        padded_vocab_size(261)


def test_special_tokens_follow_the_bpe_vocabulary_in_modernbert_order(trained):
    tokenizer = Tokenizer.from_file(str(trained.output_dir / "tokenizer.json"))
    total = tokenizer.get_vocab_size(with_added_tokens=True)
    assert total == trained.vocab_size == 512 and total % 64 == 0
    bpe = tokenizer.get_vocab_size(with_added_tokens=False)
    assert trained.bpe_vocab_size == bpe
    layout = [tokenizer.token_to_id(token) for token in ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")]
    assert layout == list(range(bpe, bpe + 5))
    unused = [tokenizer.id_to_token(index) for index in range(bpe + 5, total)]
    assert unused == [f"[unused{index}]" for index in range(trained.unused_tokens)]
    added = {token.content: token for token in tokenizer.get_added_tokens_decoder().values()}
    assert added["[MASK]"].lstrip and not added["[CLS]"].lstrip
    assert all(added[token].special for token in SPECIAL_TOKENS)


def test_unused_tokens_fill_what_a_small_corpus_cannot_learn(tmp_path):
    summary = train_tokenizer(
        [write_corpus(tmp_path / "in", "jsonl", TEXTS[:5])], tmp_path / "out", vocab_size=1000, show_progress=False
    )
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert summary.vocab_size == tokenizer.get_vocab_size() == 1024
    assert summary.unused_tokens > 0
    assert summary.bpe_vocab_size + len(SPECIAL_TOKENS) + summary.unused_tokens == 1024
    assert tokenizer.id_to_token(1023) == f"[unused{summary.unused_tokens - 1}]"


def test_templates_frame_single_texts_and_pairs(trained):
    tokenizer = Tokenizer.from_file(str(trained.output_dir / "tokenizer.json"))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    first = tokenizer.encode("alpha beta", add_special_tokens=False).ids
    second = tokenizer.encode("gamma", add_special_tokens=False).ids
    assert tokenizer.encode("alpha beta").ids == [cls, *first, sep]
    assert tokenizer.encode("alpha beta", "gamma").ids == [cls, *first, sep, *second, sep]
    assert tokenizer.decode(tokenizer.encode("Line 7, über! ").ids) == "Line 7, über! "


def test_transformers_autotokenizer_loads_the_directory(trained):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(trained.output_dir)
    tokenizer = Tokenizer.from_file(str(trained.output_dir / "tokenizer.json"))
    assert type(hf).__name__ == "PreTrainedTokenizerFast"
    for name in ("unk", "cls", "sep", "pad", "mask"):
        assert getattr(hf, f"{name}_token_id") == tokenizer.token_to_id(f"[{name.upper()}]")
    assert len(hf) == 512 and hf.model_max_length == 8192
    text = "alpha [MASK] beta"
    assert hf(text)["input_ids"] == tokenizer.encode(text).ids
    # lstrip: the space before [MASK] belongs to the mask, not to a token of its own
    alpha = hf("alpha", add_special_tokens=False)["input_ids"]
    assert hf("alpha [MASK]", add_special_tokens=False)["input_ids"] == [*alpha, hf.mask_token_id]
    assert hf("x", "y")["input_ids"][0] == hf.cls_token_id


def test_load_tokenizer_reads_the_directory(trained):
    tokenizer = load_tokenizer(trained.output_dir)
    bpe = trained.bpe_vocab_size
    ids = (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.mask_id)
    assert ids == (bpe + 1, bpe + 2, bpe + 3, bpe + 4)
    assert tokenizer.special_ids == frozenset(range(bpe, bpe + 5))
    assert tokenizer.vocab_size == 512


def test_model_max_length_is_configurable(tmp_path):
    train_tokenizer(
        [write_corpus(tmp_path / "in", "jsonl")],
        tmp_path / "out",
        vocab_size=320,
        model_max_length=1024,
        show_progress=False,
    )
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["model_max_length"] == 1024


@pytest.mark.parametrize("kind", ["txt-folder", "jsonl.gz", "jsonl.zst", "parquet"])
def test_every_input_format_trains_the_same_tokenizer(trained, tmp_path, kind):
    source = write_corpus(tmp_path / "in", kind)
    summary = train_tokenizer([source], tmp_path / "out", vocab_size=500, show_progress=False)
    assert summary.documents == trained.documents == len(TEXTS)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (trained.output_dir / "tokenizer.json").read_text()


def test_text_field_selects_the_json_field(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl_lines(corpus, TEXTS[:20], field="content")
    expected = (
        r"skipped records: missing_field: 20, first in \S+corpus.jsonl, the line at byte 0; is --text-field 'text'"
    )
    with pytest.raises(TokenizerTrainingError, match=expected):
        train_tokenizer([corpus], tmp_path / "out", vocab_size=320, show_progress=False)
    summary = train_tokenizer([corpus], tmp_path / "out", vocab_size=320, text_field="content", show_progress=False)
    assert summary.documents == 20 and summary.bad_records == {}


def test_bad_records_are_skipped_and_counted(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl_lines(corpus, TEXTS[:20])
    with corpus.open("a") as file:
        file.write('{"text": oops}\n{"title": "no text"}\n{"text": "   "}\n')
    summary = train_tokenizer([corpus], tmp_path / "out", vocab_size=320, show_progress=False)
    assert summary.documents == 20
    assert summary.bad_records == {"invalid_json": 1, "missing_field": 1}


def only_inputs_remain(directory: Path, *inputs: str) -> bool:
    return sorted(path.name for path in directory.iterdir()) == sorted(inputs)


def missing_file(root: Path) -> Path:
    return root / "missing.jsonl"


def blank_jsonl(root: Path) -> Path:
    return write_corpus(root / "in", "jsonl", ["", "  \n"])


def empty_parquet(root: Path) -> Path:
    return write_corpus(root / "in", "parquet", [])


def corrupt_zstd(root: Path) -> Path:
    file = root / "corpus.jsonl.zst"
    file.write_bytes(b"not zstd at all")
    return file


def csv_file(root: Path) -> Path:
    file = root / "table.csv"
    file.write_text("text\nhello\n")
    return file


@pytest.mark.parametrize(
    ("make_input", "error", "message"),
    [
        (missing_file, SourceError, "input not found: .*missing.jsonl"),
        (blank_jsonl, TokenizerTrainingError, r"no text found in .*corpus.jsonl$"),
        (empty_parquet, TokenizerTrainingError, r"no text found in .*corpus.parquet$"),
        (corrupt_zstd, SourceError, "corpus.jsonl.zst: corrupt or truncated archive"),
        (csv_file, SourceError, "table.csv: unsupported input"),
    ],
)
def test_bad_inputs_raise_one_clear_error_and_write_nothing(tmp_path, make_input, error, message):
    source = make_input(tmp_path)
    inputs = [path.name for path in tmp_path.iterdir()]
    with pytest.raises(error, match=message):
        train_tokenizer([source], tmp_path / "out", vocab_size=320, show_progress=False)
    assert only_inputs_remain(tmp_path, *inputs)


def test_bad_vocab_size_writes_nothing(tmp_path):
    source = write_corpus(tmp_path / "in", "jsonl")
    with pytest.raises(TokenizerTrainingError, match="vocab size 100 is too small"):
        train_tokenizer([source], tmp_path / "out", vocab_size=100, show_progress=False)
    assert only_inputs_remain(tmp_path, "in")


def test_an_existing_output_is_kept_unless_overwrite(tmp_path):
    source = write_corpus(tmp_path / "in", "jsonl")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="already exists and is not empty; use --overwrite"):
        train_tokenizer([source], tmp_path / "out", vocab_size=320, show_progress=False)
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["keep.txt"]
    train_tokenizer([source], tmp_path / "out", vocab_size=320, overwrite=True, show_progress=False)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert only_inputs_remain(tmp_path, "in", "out")


def test_an_interrupted_save_leaves_the_old_output_whole(tmp_path, monkeypatch):
    source = write_corpus(tmp_path / "in", "jsonl")
    train_tokenizer([source], tmp_path / "out", vocab_size=320, show_progress=False)
    before = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()}

    def half_save(tokenizer, directory, model_max_length):
        (Path(directory) / "tokenizer.json").write_text("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer_training, "save_tokenizer", half_save)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer([source], tmp_path / "out", vocab_size=384, overwrite=True, show_progress=False)
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == before
    assert only_inputs_remain(tmp_path, "in", "out")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "data_prep/train_tokenizer.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_trains_and_summarises(tmp_path):
    source = write_corpus(tmp_path / "in", "jsonl.zst")
    result = run_cli("--input", str(source), "--output", str(tmp_path / "out"), "--vocab-size", "320", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"flexbert prepare tokenizer: vocab 320 (315 BPE + 5 special + 0 unused), 200 documents -> {tmp_path / 'out'}\n"
    )
    assert load_tokenizer(tmp_path / "out").vocab_size == 320


def test_cli_reports_bad_input_in_one_line_with_status_2(tmp_path):
    result = run_cli("--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr == f"flexbert: error: input not found: {tmp_path / 'missing'} does not exist\n"
    assert not (tmp_path / "out").exists()


def test_load_tokenizer_reads_modernbert():
    tokenizer = load_tokenizer(TOKENIZER)
    assert (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.mask_id) == (50281, 50282, 50283, 50284)
    assert tokenizer.vocab_size == 50368
    assert {50280, 50281, 50282, 50283, 50284} <= tokenizer.special_ids


def test_autotokenizer_reads_modernbert():
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(TOKENIZER)
    assert (hf.cls_token_id, hf.sep_token_id, hf.pad_token_id, hf.mask_token_id) == (50281, 50282, 50283, 50284)
    assert len(hf) == 50368


def test_load_tokenizer_rejects_a_tokenizer_without_mask(tmp_path):
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3, "hello": 4}
    Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=r"has no mask token '\[MASK\]'; MLM needs"):
        load_tokenizer(tmp_path)
