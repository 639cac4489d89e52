"""Vocabulary extension: `prepare tokenizer --extend` keeps every id and special token, pads to a
multiple of 64, shortens the corpus; `core/vocabulary.py` grows per-token tensors to match.

The oracles are independent of the code under test: the source tokenizer itself (ids, names,
encodings), transformers' AutoTokenizer, and each new token's pieces computed here from its
decoded text."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TOKENIZER

from flexbert.cli import main as flexbert_main
from flexbert.core.atomic_output import OutputExistsError
from flexbert.core.sources import SourceError
from flexbert.core.tokenizer import TokenizerError, load_tokenizer
from flexbert.core.vocabulary import (
    DIFFERENT,
    EXTENDED,
    SAME,
    VocabularyError,
    byte_level_decoder,
    byte_level_text,
    compare_vocabularies,
    extend_vocabulary_rows,
    is_extension,
    new_token_pieces,
    vocabulary_relation,
)
from flexbert.data import tokenizer_extension
from flexbert.data.tokenizer_extension import TokenizerExtensionError, count_words, extend_tokenizer, learn_merges
from flexbert.data.tokenizer_training import train_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers

REPO = Path(__file__).resolve().parents[1]
SOURCE_SIZE = 50368  # ModernBERT's ids
DOMAIN = (
    "mitochondrial phosphorylation glycolysis oxidoreductase transcriptome ubiquitination chromatography "
    "electrophoresis immunoprecipitation cytoskeleton Zellmembranprotein Stoffwechselweg 線形代数 蛋白質"
).split()
COMMON = "the of and a in to is was with for by on we then our".split()


def domain_texts(count: int = 240, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(DOMAIN if rng.random() < 0.4 else COMMON) for _ in range(rng.randint(20, 40)))
        + f".\nSample {index}: über {rng.choice(DOMAIN)}."
        for index in range(count)
    ]


TEXTS = domain_texts()
GENERAL = ["We then went to the station, and the train was late again. Our tickets cost 12 dollars."]


def write_jsonl(file: Path, texts: list[str]) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return file


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "domain.jsonl", TEXTS)


@pytest.fixture(scope="module")
def extended(corpus, tmp_path_factory):
    """ModernBERT's tokenizer extended by up to 40 tokens learnt from TEXTS."""
    out = tmp_path_factory.mktemp("extended") / "tok"
    return extend_tokenizer(TOKENIZER, [corpus], out, add=40, show_progress=False)


@pytest.fixture(scope="module")
def hf_pair(extended):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER), AutoTokenizer.from_pretrained(extended.output_dir)


def raw(directory: Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))


# --- the extended tokenizer ---------------------------------------------------------------------


def test_every_existing_id_and_name_is_unchanged(extended):
    source, grown = raw(TOKENIZER), raw(extended.output_dir)
    assert [grown.id_to_token(i) for i in range(SOURCE_SIZE)] == [source.id_to_token(i) for i in range(SOURCE_SIZE)]
    grown_vocab = grown.get_vocab(with_added_tokens=True)
    assert all(grown_vocab[token] == token_id for token, token_id in source.get_vocab(with_added_tokens=True).items())
    grown_added = grown.get_added_tokens_decoder()
    for token_id, token in source.get_added_tokens_decoder().items():
        assert str(grown_added[token_id]) == str(token)  # content and every flag


def test_old_ids_mean_the_same_on_the_corpus_and_general_text_encodes_as_before(extended):
    source, grown = raw(TOKENIZER), raw(extended.output_dir)
    for encoding in grown.encode_batch(TEXTS):
        old = [token_id for token_id in encoding.ids if token_id < SOURCE_SIZE]
        assert [grown.id_to_token(i) for i in old] == [source.id_to_token(i) for i in old]
    # text that offers none of the new merges is encoded token for token as the source does
    assert grown.encode_batch(GENERAL)[0].ids == source.encode_batch(GENERAL)[0].ids


def test_special_tokens_keep_their_ids_and_names(extended):
    source, grown = load_tokenizer(TOKENIZER), load_tokenizer(extended.output_dir)
    fields = ("cls_id", "sep_id", "pad_id", "mask_id")
    assert [getattr(grown, name) for name in fields] == [getattr(source, name) for name in fields]
    assert grown.special_ids == source.special_ids
    assert (extended.output_dir / "special_tokens_map.json").read_bytes() == (
        TOKENIZER / "special_tokens_map.json"
    ).read_bytes()
    old_config = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    new_config = json.loads((extended.output_dir / "tokenizer_config.json").read_text())
    for key in ("cls_token", "sep_token", "pad_token", "mask_token", "unk_token", "model_max_length"):
        assert new_config[key] == old_config[key]
    assert all(
        new_config["added_tokens_decoder"][key] == value for key, value in old_config["added_tokens_decoder"].items()
    )


def test_vocabulary_is_padded_to_a_multiple_of_64_with_unused_tokens(extended, hf_pair):
    grown = raw(extended.output_dir)
    assert extended.vocab_size % 64 == 0 and extended.vocab_size > SOURCE_SIZE
    assert 0 < extended.new_tokens <= 40
    assert extended.vocab_size == SOURCE_SIZE + extended.new_tokens + extended.unused_tokens
    assert extended.vocab_size == load_tokenizer(extended.output_dir).vocab_size == len(hf_pair[1])
    assert grown.get_vocab_size(with_added_tokens=True) == extended.vocab_size
    first_padding = SOURCE_SIZE + extended.new_tokens
    names = [grown.id_to_token(i) for i in range(first_padding, extended.vocab_size)]
    assert names == [f"[unused{83 + i}]" for i in range(extended.unused_tokens)]  # ModernBERT's end at 82
    added = grown.get_added_tokens_decoder()
    template = str(added[SOURCE_SIZE - 1]).replace("[unused82]", "{}")  # ModernBERT's last padding token
    assert all(
        str(added[i]) == template.replace("{}", added[i].content) for i in range(first_padding, extended.vocab_size)
    )
    config = json.loads((extended.output_dir / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"][str(extended.vocab_size - 1)]["content"] == names[-1]
    assert (extended.output_dir / "LICENSE").is_file() and "--extend" in (extended.output_dir / "NOTICE").read_text()


def test_transformers_encodes_the_corpus_as_load_tokenizer_does(extended, hf_pair):
    hf = hf_pair[1]
    mlm = load_tokenizer(extended.output_dir)
    assert hf(TEXTS)["input_ids"] == [encoding.ids for encoding in mlm.tokenizer.encode_batch(TEXTS)]
    assert hf(TEXTS, add_special_tokens=False)["input_ids"] == mlm.encode_batch(TEXTS)
    masked = "mitochondrial [MASK] glycolysis"
    assert hf(masked)["input_ids"] == mlm.tokenizer.encode(masked).ids
    assert hf.mask_token_id in hf(masked)["input_ids"]


def test_the_corpus_takes_fewer_tokens_and_the_summary_measures_it(extended):
    source, grown = load_tokenizer(TOKENIZER), load_tokenizer(extended.output_dir)
    before = sum(map(len, source.encode_batch(TEXTS)))
    after_ids = grown.encode_batch(TEXTS)
    assert (extended.source_tokens, extended.tokens) == (before, sum(map(len, after_ids)))
    assert extended.tokens < extended.source_tokens and 0 < extended.reduction < 1
    used = {token_id for ids in after_ids for token_id in ids if token_id >= SOURCE_SIZE}
    assert len(used) >= extended.new_tokens // 2  # the new tokens are what the corpus is now made of
    assert extended.documents == len(TEXTS)


def test_continued_training_predicts_the_extended_encoding(extended):
    """The training's own count of merged tokens is what the saved tokenizer then does."""
    source = raw(TOKENIZER)
    counted = count_words(source, TEXTS, show_progress=False)
    spell = {token_id: source.model.id_to_token(token_id) for word in counted.words for token_id in word}
    taken = set(source.get_vocab(with_added_tokens=True)) | set(source.get_vocab(with_added_tokens=False))
    merges = learn_merges(counted.words, spell, taken, SOURCE_SIZE, 40, show_progress=False)
    grown = raw(extended.output_dir)
    assert [merge.token for merge in merges] == [grown.id_to_token(SOURCE_SIZE + i) for i in range(len(merges))]
    assert counted.tokens - sum(merge.occurrences for merge in merges) == extended.tokens
    assert all(byte_level_text(merge.token) is not None for merge in merges)


def test_byte_level_decoding_matches_the_pre_tokenizer():
    assert set(byte_level_decoder()) == set(pre_tokenizers.ByteLevel.alphabet())
    text = "".join(map(chr, range(1, 0x800))) + "線形代数 😀"
    ((spelled, _),) = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    assert byte_level_text(spelled) == text
    assert byte_level_text("Ġfoo") == " foo"
    assert byte_level_text(spelled[-1]) is None  # the last byte of 😀 alone is no character


# --- the model side: comparing vocabularies and growing rows -------------------------------------


def test_compare_vocabularies_tells_same_extended_and_different(extended, tmp_path):
    assert compare_vocabularies(TOKENIZER, TOKENIZER).relation == SAME
    comparison = compare_vocabularies(TOKENIZER, extended.output_dir)
    assert (comparison.relation, comparison.source_size, comparison.other_size) == (
        EXTENDED,
        SOURCE_SIZE,
        extended.vocab_size,
    )
    assert vocabulary_relation(TOKENIZER, extended.output_dir) == EXTENDED
    assert is_extension(TOKENIZER, extended.output_dir) and not is_extension(extended.output_dir, TOKENIZER)
    small = train_tokenizer(
        [write_jsonl(tmp_path / "c.jsonl", TEXTS)], tmp_path / "small", vocab_size=320, show_progress=False
    )
    different = compare_vocabularies(TOKENIZER, small.output_dir)
    assert different.relation == DIFFERENT and "fewer than the 50368" in different.reason
    with pytest.raises(VocabularyError, match="does not extend"):
        vocabulary_relation(TOKENIZER, small.output_dir)


def moved_id_copy(extended, tmp_path: Path) -> Path:
    """The extension with two old tokens' ids swapped."""
    copy = tmp_path / "moved"
    shutil.copytree(extended.output_dir, copy)
    data = json.loads((copy / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["Ġthe"], vocab["Ġof"] = vocab["Ġof"], vocab["Ġthe"]
    (copy / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    return copy


def renamed_mask_copy(extended, tmp_path: Path) -> Path:
    """The extension whose config names another mask token (an [unused] one)."""
    copy = tmp_path / "renamed"
    shutil.copytree(extended.output_dir, copy)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((copy / name).read_text())
        config["mask_token"] = "[unused0]"
        (copy / name).write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (moved_id_copy, r"id \d+ is 'Ġ(the|of)' in .* but 'Ġ(the|of)' in"),
        (renamed_mask_copy, "mask_token is '\\[MASK\\]'"),
    ],
)
def test_a_tokenizer_that_moves_an_id_or_special_token_is_refused(extended, tmp_path, tamper, reason):
    copy = tamper(extended, tmp_path)
    comparison = compare_vocabularies(TOKENIZER, copy)
    assert comparison.relation == DIFFERENT
    assert len(comparison.reason.splitlines()) == 1
    with pytest.raises(VocabularyError, match=reason):
        extend_vocabulary_rows(torch.zeros(SOURCE_SIZE, 4), TOKENIZER, copy, extended.vocab_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_keep_old_values_and_new_tokens_start_at_their_pieces_mean(extended, hf_pair, dtype):
    hf_source, hf_grown = hf_pair
    embeddings = torch.randn(SOURCE_SIZE, 16).to(dtype)  # [V, H]
    bias = torch.randn(SOURCE_SIZE).to(dtype)  # [V]
    new_size = extended.vocab_size
    grown_embeddings = extend_vocabulary_rows(embeddings, TOKENIZER, extended.output_dir, new_size)
    grown_bias = extend_vocabulary_rows(bias, TOKENIZER, extended.output_dir, new_size)
    assert grown_embeddings.shape == (new_size, 16) and grown_bias.shape == (new_size,)
    assert grown_embeddings.dtype == grown_bias.dtype == dtype
    assert torch.equal(grown_embeddings[:SOURCE_SIZE], embeddings) and torch.equal(grown_bias[:SOURCE_SIZE], bias)
    first_padding = SOURCE_SIZE + extended.new_tokens
    for token_id in range(SOURCE_SIZE, first_padding):
        text = hf_grown.decode([token_id], clean_up_tokenization_spaces=False)
        pieces = hf_source(text, add_special_tokens=False)["input_ids"]
        assert len(pieces) >= 2 and max(pieces) < SOURCE_SIZE
        assert torch.equal(grown_embeddings[token_id], embeddings[pieces].float().mean(0).to(dtype))
        assert torch.equal(grown_bias[token_id], bias[pieces].float().mean(0).to(dtype))
    padding = embeddings.float().mean(0).to(dtype)
    assert all(torch.equal(grown_embeddings[i], padding) for i in range(first_padding, new_size))
    assert set(new_token_pieces(TOKENIZER, extended.output_dir)) == set(range(SOURCE_SIZE, first_padding))


def test_rows_beyond_the_tokenizer_are_kept_and_the_size_may_grow_further(extended):
    rows = torch.randn(SOURCE_SIZE + 64 + 64, 4)  # a model already larger than its tokenizer
    grown = extend_vocabulary_rows(rows, TOKENIZER, extended.output_dir, rows.shape[0] + 64)
    first_padding = SOURCE_SIZE + extended.new_tokens
    assert torch.equal(grown[:SOURCE_SIZE], rows[:SOURCE_SIZE])
    assert torch.equal(grown[first_padding : rows.shape[0]], rows[first_padding:])  # padding keeps the source's
    assert torch.equal(grown[-1], rows[:SOURCE_SIZE].mean(0))


@pytest.mark.parametrize(
    ("rows", "new_size", "message"),
    [
        (torch.zeros(100, 4), 50432, "a tensor of 100 rows cannot hold the 50368 ids of"),
        (torch.zeros(SOURCE_SIZE, 4), SOURCE_SIZE, "new size 50368 is smaller than the 504\\d\\d ids of"),
        (torch.zeros(SOURCE_SIZE, 4, dtype=torch.long), 50432, "must be floating point"),
    ],
)
def test_rows_that_do_not_fit_are_refused(extended, rows, new_size, message):
    with pytest.raises(VocabularyError, match=message):
        extend_vocabulary_rows(rows, TOKENIZER, extended.output_dir, new_size)


def test_a_flexbert_trained_tokenizer_extends_too(tmp_path):
    """A layout other than ModernBERT's: the special tokens right after the BPE, no added tokens before."""
    general = [" ".join(random.Random(i).choice(COMMON) for _ in range(30)) + " abc xyz" for i in range(100)]
    small = train_tokenizer(
        [write_jsonl(tmp_path / "g.jsonl", general)], tmp_path / "small", vocab_size=320, show_progress=False
    )
    summary = extend_tokenizer(
        small.output_dir, [write_jsonl(tmp_path / "d.jsonl", TEXTS)], tmp_path / "ext", add=100, show_progress=False
    )
    assert summary.vocab_size % 64 == 0 and summary.source_vocab_size == 320 and summary.tokens < summary.source_tokens
    assert compare_vocabularies(small.output_dir, summary.output_dir).relation == EXTENDED
    rows = torch.randn(320, 8)
    grown = extend_vocabulary_rows(rows, small.output_dir, summary.output_dir, summary.vocab_size)
    assert torch.equal(grown[:320], rows)
    source = raw(small.output_dir)
    token_id = 320  # the first new token
    pieces = source.encode(raw(summary.output_dir).decode([token_id]), add_special_tokens=False).ids
    assert torch.allclose(grown[token_id], rows[pieces].mean(0))


# --- bad input: one line, nothing written --------------------------------------------------------


def not_a_tokenizer(root: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def garbled_tokenizer(root: Path) -> Path:
    (root / "garbled").mkdir()
    (root / "garbled" / "tokenizer.json").write_text("{")
    return root / "garbled"


def word_level_tokenizer(root: Path) -> Path:
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3, "[MASK]": 4, "hello": 5}
    (root / "words").mkdir()
    Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(str(root / "words" / "tokenizer.json"))
    return root / "words"


@pytest.mark.parametrize(
    ("make_source", "error", "message"),
    [
        (
            not_a_tokenizer,
            TokenizerError,
            r"source tokenizer \(--extend\): tokenizer not found: .*empty/tokenizer.json",
        ),
        (garbled_tokenizer, TokenizerError, r"garbled/tokenizer.json: not a valid tokenizers file"),
        (word_level_tokenizer, TokenizerExtensionError, r"words is a WordLevel model; --extend needs a byte-level BPE"),
    ],
)
def test_a_source_that_is_no_byte_level_bpe_is_refused(tmp_path, corpus, make_source, error, message):
    source = make_source(tmp_path)
    with pytest.raises(error, match=message):
        extend_tokenizer(source, [corpus], tmp_path / "out", add=10, show_progress=False)
    assert not (tmp_path / "out").exists()


def blank_corpus(root: Path) -> Path:
    return write_jsonl(root / "blank.jsonl", ["", "   "])


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"add": 0}, TokenizerExtensionError, "--add 0: the number of tokens to add must be at least 1"),
        ({"add": -5}, TokenizerExtensionError, "--add -5: the number of tokens to add must be at least 1"),
        ({"inputs": "missing"}, SourceError, "input not found: .*missing.jsonl does not exist"),
        ({"inputs": "blank"}, TokenizerExtensionError, "no text found in .*blank.jsonl"),
        ({"min_frequency": 10**6}, TokenizerExtensionError, "no new token to learn from .*: no pair .* 1000000 times"),
    ],
)
def test_bad_requests_raise_one_clear_error_and_write_nothing(tmp_path, corpus, arguments, error, message):
    inputs = {"missing": tmp_path / "missing.jsonl", "blank": blank_corpus(tmp_path)}.get(
        arguments.pop("inputs", None), corpus
    )
    options = {"add": 10, "show_progress": False, **arguments}
    before = sorted(path.name for path in tmp_path.iterdir())
    with pytest.raises(error, match=message):
        extend_tokenizer(TOKENIZER, [inputs], tmp_path / "out", **options)
    assert sorted(path.name for path in tmp_path.iterdir()) == before  # no output, no staging folder


def test_an_existing_output_is_kept(tmp_path, corpus):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="already exists and is not empty; use --overwrite"):
        extend_tokenizer(TOKENIZER, [corpus], tmp_path / "out", add=10, show_progress=False)
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_an_extension_that_would_move_an_id_is_refused_before_writing(tmp_path, corpus, monkeypatch):
    build = tokenizer_extension.extended_tokenizer_json

    def moving(data, merges, first_id):
        extended, padding = build(data, merges, first_id)
        extended["model"]["vocab"]["Ġthe"] = first_id  # a new token steals an old one's place
        extended["model"]["vocab"][merges[0].token] = data["model"]["vocab"]["Ġthe"]
        return extended, padding

    monkeypatch.setattr(tokenizer_extension, "extended_tokenizer_json", moving)
    with pytest.raises(TokenizerExtensionError, match="refusing to write the extension: .* does not extend"):
        extend_tokenizer(TOKENIZER, [corpus], tmp_path / "out", add=10, show_progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


# --- the command line ----------------------------------------------------------------------------


def test_cli_extends_and_reports_the_reduction(tmp_path, corpus):
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from flexbert.cli import main; sys.exit(main())", "prepare", "tokenizer"]
        + ["--extend", str(TOKENIZER), "--input", str(corpus), "--add", "40", "--output", str(tmp_path / "out")]
        + ["--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    summary = extend_tokenizer(TOKENIZER, [corpus], tmp_path / "again", add=40, show_progress=False)
    percent = 100 * summary.reduction
    assert result.stdout == (
        f"flexbert prepare tokenizer: extended {TOKENIZER} to vocab {summary.vocab_size} (50368 + "
        f"{summary.new_tokens} new of 40 asked + {summary.unused_tokens} unused); corpus tokens "
        f"{summary.source_tokens:,} -> {summary.tokens:,} (-{percent:.1f}%), {len(TEXTS)} documents "
        f"-> {tmp_path / 'out'}\n"
    )
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "again" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--add", "0"], "--add 0: the number of tokens to add must be at least 1"),
        (
            ["--add", "5", "--extend", "{tmp}/nowhere"],
            "source tokenizer (--extend): tokenizer not found: {tmp}/nowhere/tokenizer.json does not exist",
        ),
        (["--add", "5", "--input", "{tmp}/missing.jsonl"], "input not found: {tmp}/missing.jsonl does not exist"),
        (
            ["--add", "5", "--output", "{tmp}/taken"],
            "output {tmp}/taken already exists and is not empty; use --overwrite to replace it",
        ),
        ([], "--extend needs --add N, the number of tokens to learn"),
        (
            ["--add", "5", "--vocab-size", "60000"],
            "--vocab-size does not go with --extend: the size follows from --add",
        ),
    ],
)
def test_cli_reports_bad_input_in_one_line_with_status_2(tmp_path, corpus, capsys, arguments, message):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    values = {"--extend": str(TOKENIZER), "--input": str(corpus), "--output": str(tmp_path / "out")}
    extra = [argument.format(tmp=tmp_path) for argument in arguments]
    for flag in extra[::2]:  # the options given replace the defaults
        values.pop(flag, None)
    argv = ["prepare", "tokenizer", *[item for pair in values.items() for item in pair], *extra, "--no-progress"]
    assert flexbert_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == f"flexbert: error: {message.format(tmp=tmp_path)}\n"
    assert not (tmp_path / "out").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taken"]
