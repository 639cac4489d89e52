"""Extending a trained byte-level BPE tokenizer with tokens learnt from a domain corpus.

The method is continued BPE training. The source tokenizer encodes the corpus, and each pre-token
("word": what the BPE model sees, after the source's added tokens, normalizer and pre-tokenizer)
is counted as the sequence of source tokens it became. BPE training then goes on from there: the
most frequent pair of adjacent tokens becomes a new token, every occurrence is merged, and so on,
up to ``add`` tokens or until no pair occurs ``min_frequency`` times. A pair is passed over when it
would spell a token the source already has (the source's own merges decide how its tokens form),
or bytes that are not whole UTF-8 characters (so that every new token has a text, which the model
side needs to initialise its row from the source's pieces of that text).

The new tokens take the ids after the source's last id, in the order they were learnt (most
frequent first), and their merges go after all of the source's. A BPE applies merges by rank, so
the extended tokenizer first splits a word exactly as the source does, then applies the new merges
in the order they were learnt: precisely the segmentation the training counted. Text that offers no
new merge is encoded as before, token for token. Then ``[unusedN]`` padding tokens (added tokens,
not special, numbered on from the source's, as ModernBERT's are) round the id space up to a
multiple of 64. Every id, token name, added token and special token of the source is unchanged;
that is checked on the finished tokenizer before it is written, and the corpus is encoded again
with it to measure how many tokens fewer it takes.
"""

from __future__ import annotations

import heapq
import json
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from flexbert.core.atomic_output import atomic_output_dir
from flexbert.core.sources import BadRecords, find_inputs, iter_documents
from flexbert.core.tokenizer import MLMTokenizer, TokenizerError, load_tokenizer, special_token_names
from flexbert.core.vocabulary import (
    PADDING_TOKEN,
    VocabularyError,
    byte_level_text,
    id_space,
    is_byte_level,
    require_extension,
)
from flexbert.data.tokenizer_training import VOCAB_MULTIPLE
from flexbert.errors import FlexBertError
from tokenizers import Encoding, Tokenizer

BATCH_DOCUMENTS = 256  # documents encoded per call: enough for the tokenizer's threads, little memory
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md")
NOTICE_FILE = "NOTICE"


class TokenizerExtensionError(FlexBertError, ValueError):
    """A tokenizer cannot be extended as asked: no tokens to add, a source that is no byte-level BPE,
    a corpus without text or without anything to learn."""


@dataclass(frozen=True)
class Merge:
    left: str
    right: str
    token: str  # left + right, a new token
    occurrences: int  # how many tokens fewer the corpus took once it was merged


@dataclass(frozen=True)
class WordCounts:
    words: Counter[tuple[int, ...]]  # each word of two or more source tokens, by how often it occurs
    tokens: int  # source tokens in the whole corpus
    documents: int


@dataclass(frozen=True)
class ExtensionSummary:
    output_dir: Path
    source_dir: Path
    source_vocab_size: int  # the source's id space
    vocab_size: int  # the extension's id space, a multiple of 64: the model's vocab_size
    new_tokens: int
    unused_tokens: int  # padding added to reach the multiple of 64
    documents: int
    bad_records: dict[str, int]
    source_tokens: int  # the corpus, encoded with the source
    tokens: int  # the corpus, encoded with the extension

    @property
    def reduction(self) -> float:
        """The share of the corpus's tokens the extension saves."""
        return 1 - self.tokens / self.source_tokens if self.source_tokens else 0.0


def _check_source(path: Path) -> tuple[MLMTokenizer, dict]:
    """The source tokenizer and its tokenizer.json, once it is known to be a byte-level BPE."""
    try:
        mlm = load_tokenizer(path)
    except TokenizerError as err:
        raise TokenizerError(f"source tokenizer (--extend): {err}") from None
    file = Path(path) if Path(path).suffix == ".json" else mlm.path / "tokenizer.json"
    data = json.loads(file.read_text(encoding="utf-8"))  # the file as written, to edit and keep the rest of
    model = data.get("model", {})
    if model.get("type") != "BPE" or not is_byte_level(mlm.tokenizer):
        kind = (
            f"a {model.get('type')} model" if model.get("type") != "BPE" else "a BPE without byte-level pre-tokenizing"
        )
        raise TokenizerExtensionError(f"source tokenizer {mlm.path} is {kind}; --extend needs a byte-level BPE")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("dropout"):
        raise TokenizerExtensionError(
            f"source tokenizer {mlm.path} uses subword prefixes, suffixes or dropout, which --extend does not support"
        )
    return mlm, data


def _plain(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer`` encoding whole documents: no truncation or padding a tokenizer.json may set."""
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch = []
    for text in documents:
        if text.strip():  # blank documents hold no words, and are not counted either
            batch.append(text)
        if len(batch) == BATCH_DOCUMENTS:
            yield batch
            batch = []
    if batch:
        yield batch


def _words(encoding: Encoding) -> Iterator[tuple[int, ...]]:
    """The encoding's words (pre-tokens) of two or more tokens, as their ids; one token has no pair."""
    ids, word_ids = encoding.ids, encoding.word_ids
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or word_ids[end] != word_ids[start]:
            if end - start > 1:
                yield tuple(ids[start:end])
            start = end


def count_words(source: Tokenizer, documents: Iterable[str], show_progress: bool = True) -> WordCounts:
    """How the source splits the corpus: its words, counted, and its total tokens and documents."""
    words: Counter[tuple[int, ...]] = Counter()
    tokens = count = 0
    with tqdm(desc="counting words", unit=" documents", disable=not show_progress) as bar:
        for batch in _batches(documents):
            for encoding in source.encode_batch(batch, add_special_tokens=False):
                tokens += len(encoding.ids)
                words.update(_words(encoding))
            count += len(batch)
            bar.update(len(batch))
    return WordCounts(words, tokens, count)


def count_tokens(tokenizer: Tokenizer, documents: Iterable[str], show_progress: bool = True) -> int:
    """The tokens ``tokenizer`` encodes the corpus into (without special tokens)."""
    tokens = 0
    with tqdm(desc="measuring", unit=" documents", disable=not show_progress) as bar:
        for batch in _batches(documents):
            tokens += sum(len(encoding.ids) for encoding in tokenizer.encode_batch(batch, add_special_tokens=False))
            bar.update(len(batch))
    return tokens


def _merge_word(word: list[int], left: int, right: int, merged: int) -> list[int]:
    """``word`` with each (left, right), from the left, replaced by ``merged``, as BPE applies a merge."""
    out, index = [], 0
    while index < len(word):
        if index + 1 < len(word) and word[index] == left and word[index + 1] == right:
            out.append(merged)
            index += 2
        else:
            out.append(word[index])
            index += 1
    return out


class _PairTable:
    """Continued BPE training's state: every word's current tokens, and each adjacent pair's count
    and the words it occurs in, updated merge by merge (only the words a merge touches)."""

    def __init__(self, words: Counter[tuple[int, ...]], spell: dict[int, str]):
        self.spell = spell  # token id -> its string in the BPE vocabulary
        self.words = [list(word) for word in words]
        self.counts = list(words.values())
        self.pairs: Counter[tuple[int, int]] = Counter()
        self.where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
        for index, (word, count) in enumerate(zip(self.words, self.counts)):
            for pair in zip(word, word[1:]):
                self.pairs[pair] += count
                self.where[pair].add(index)
        # A max-heap of (count, pair), ties broken by the pair's strings so that runs agree; entries go
        # stale as counts change, and each change pushes the pair's new count.
        self.heap = [self._entry(pair, count) for pair, count in self.pairs.items()]
        heapq.heapify(self.heap)

    def _entry(self, pair: tuple[int, int], count: int) -> tuple:
        return (-count, self.spell[pair[0]], self.spell[pair[1]], pair)

    def pop(self) -> tuple[tuple[int, int], int] | None:
        """The most frequent pair and its count, or None when no pair is left."""
        while self.heap:
            negative, _, _, pair = heapq.heappop(self.heap)
            if self.pairs.get(pair) == -negative:
                return pair, -negative
        return None

    def merge(self, pair: tuple[int, int], merged: int) -> int:
        """Merge ``pair`` into the token ``merged`` in every word; returns how many tokens that saves."""
        delta: Counter[tuple[int, int]] = Counter()
        saved = 0
        for index in self.where.pop(pair, ()):
            word, count = self.words[index], self.counts[index]
            new = _merge_word(word, *pair, merged)
            saved += (len(word) - len(new)) * count
            old_pairs, new_pairs = list(zip(word, word[1:])), list(zip(new, new[1:]))
            for gone in old_pairs:
                delta[gone] -= count
            for come in new_pairs:
                delta[come] += count
            for gone in set(old_pairs) - set(new_pairs) - {pair}:
                self.where[gone].discard(index)
            for come in new_pairs:
                self.where[come].add(index)
            self.words[index] = new
        for changed, change in delta.items():
            if change:
                self.pairs[changed] += change
                if self.pairs[changed] > 0:
                    heapq.heappush(self.heap, self._entry(changed, self.pairs[changed]))
                else:
                    del self.pairs[changed]
        return saved


def learn_merges(
    words: Counter[tuple[int, ...]],
    spell: dict[int, str],
    taken: set[str],
    first_id: int,
    limit: int,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> list[Merge]:
    """Up to ``limit`` merges continuing a BPE from the counted ``words`` (source ids), most frequent first.

    ``spell`` gives each id's BPE string (it gains the new tokens, ids from ``first_id``); ``taken``
    holds the strings the source already has. A pair that would spell a taken string, or bytes that
    are not whole UTF-8 characters, is passed over; learning stops at a pair seen fewer than
    ``min_frequency`` times.
    """
    table = _PairTable(words, spell)
    merges: list[Merge] = []
    passed_over: set[tuple[int, int]] = set()  # for good: the reason is in their spelling
    with tqdm(total=limit, desc="learning tokens", unit=" tokens", disable=not show_progress) as bar:
        while len(merges) < limit and (best := table.pop()) is not None:
            pair, count = best
            if count < min_frequency:
                break
            token = spell[pair[0]] + spell[pair[1]]
            if pair in passed_over or token in taken or byte_level_text(token) is None:
                passed_over.add(pair)
                continue
            spell[first_id + len(merges)] = token
            taken.add(token)
            saved = table.merge(pair, first_id + len(merges))
            merges.append(Merge(spell[pair[0]], spell[pair[1]], token, saved))
            bar.update(1)
    return merges


def _unused_numbers(data: dict) -> Iterator[int]:
    """The numbers N free for new ``[unusedN]`` tokens, from one past the source's largest."""
    names = set(data["model"]["vocab"]) | {token["content"] for token in data["added_tokens"]}
    numbers = [int(name[len("[unused") : -1]) for name in names if PADDING_TOKEN.fullmatch(name)]
    number = max(numbers, default=-1) + 1
    while True:
        if f"[unused{number}]" not in names:
            yield number
        number += 1


def _padding_template(data: dict) -> dict:
    """The flags of the source's padding tokens (ModernBERT's: normalized, not special)."""
    padding = [token for token in data["added_tokens"] if PADDING_TOKEN.fullmatch(token["content"])]
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}
    return {key: padding[-1][key] for key in flags if key in padding[-1]} if padding else flags


def extended_tokenizer_json(data: dict, merges: Sequence[Merge], first_id: int) -> tuple[dict, list[dict]]:
    """The source's tokenizer.json ``data`` with ``merges`` added, padded to a multiple of 64 ids.

    Returns the new tokenizer.json and the padding tokens it added (as its ``added_tokens`` entries).
    """
    extended = json.loads(json.dumps(data))  # a deep copy: the source's dict stays as it was
    model = extended["model"]
    # tokenizers does not read an added token's id from the file: it takes the id the token's text
    # has in the BPE vocabulary, or else numbers it after the BPE vocabulary, which the new tokens
    # lengthen. So every added token enters the BPE vocabulary under its id (as ModernBERT's first
    # ones already do); no merge spells one, so the BPE never produces it from text.
    for token in extended["added_tokens"]:
        model["vocab"].setdefault(token["content"], token["id"])
    for offset, merge in enumerate(merges):
        model["vocab"][merge.token] = first_id + offset
    # Merges after all of the source's: a BPE applies the source's first, so old text splits as before.
    as_lists = bool(model["merges"]) and isinstance(model["merges"][0], list)
    model["merges"] += [[merge.left, merge.right] if as_lists else f"{merge.left} {merge.right}" for merge in merges]
    size = first_id + len(merges)
    total = -(-size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    template, numbers = _padding_template(data), _unused_numbers(data)
    padding = [{"id": token_id, "content": f"[unused{next(numbers)}]", **template} for token_id in range(size, total)]
    extended["added_tokens"] += padding
    model["vocab"] |= {token["content"]: token["id"] for token in padding}
    return extended, padding


def _tokenizer_config(source_dir: Path, padding: list[dict], model_max_length: int | None) -> dict:
    """The source's tokenizer_config.json (special token names and all), knowing the new padding tokens."""
    file = source_dir / "tokenizer_config.json"
    if file.is_file():
        config = json.loads(file.read_text())
    else:
        names = special_token_names(source_dir)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "clean_up_tokenization_spaces": False}
    if "added_tokens_decoder" in config:
        config["added_tokens_decoder"] |= {
            str(token["id"]): {key: value for key, value in token.items() if key != "id"} for token in padding
        }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    return config


def _write(
    staging: Path, source_dir: Path, extended: dict, padding: list[dict], model_max_length: int | None, added: int
) -> None:
    """The extended tokenizer's directory: tokenizer.json and the source's config files, its licence
    and notice (which now says what changed)."""
    # Written as the source's JSON, edited, so that all the rest of it stays as it was.
    (staging / "tokenizer.json").write_text(json.dumps(extended, indent=2, ensure_ascii=False) + "\n")
    config = _tokenizer_config(source_dir, padding, model_max_length)
    (staging / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special = source_dir / "special_tokens_map.json"
    if special.is_file():
        shutil.copyfile(special, staging / special.name)
    else:
        names = special_token_names(source_dir)
        (staging / special.name).write_text(json.dumps(names, indent=2) + "\n")
    for name in LICENSE_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, staging / name)
    if (source_dir / NOTICE_FILE).is_file():
        change = (
            f"\nModified by flexbert prepare tokenizer --extend: {added} tokens learnt from a corpus were added "
            f"after the ids above, and {len(padding)} [unusedN] padding tokens after them; every existing id "
            "is unchanged.\n"
        )
        (staging / NOTICE_FILE).write_text((source_dir / NOTICE_FILE).read_text() + change)


def _check_extension(source_dir: Path, staging: Path, total: int) -> None:
    """Refuse to write an extension that moved an existing id, or whose size is not the padded total."""
    source, extended = load_tokenizer(source_dir), load_tokenizer(staging)
    try:
        require_extension(source, extended)
    except VocabularyError as err:
        raise TokenizerExtensionError(f"refusing to write the extension: {err}") from None
    if id_space(extended.tokenizer) != total:
        raise TokenizerExtensionError(
            f"refusing to write the extension: {id_space(extended.tokenizer)} ids, not {total}"
        )
    if id_space(source.tokenizer) == source.vocab_size and extended.vocab_size != total:
        # transformers' len(tokenizer) and load_tokenizer count tokens, not ids; keep them the model's size
        raise TokenizerExtensionError(
            f"refusing to write the extension: it counts {extended.vocab_size} tokens for {total} ids"
        )


def extend_tokenizer(
    source_dir: str | Path,
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    *,
    add: int,
    text_field: str = "text",
    min_frequency: int = 2,
    model_max_length: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> ExtensionSummary:
    """Add up to ``add`` tokens learnt from the corpus ``inputs`` to the tokenizer at ``source_dir``,
    and save the result to ``output_dir`` atomically (see the module's docstring for the method).

    ``model_max_length`` None keeps the source's. Errors name the problem in one line and leave
    ``output_dir`` as it was: ``add`` < 1 or a source that is no byte-level BPE
    (TokenizerExtensionError), no tokenizer at all (TokenizerError), a missing or unreadable input
    (SourceError), an occupied ``output_dir`` without ``overwrite`` (OutputExistsError), a corpus
    without text or without a pair to merge (TokenizerExtensionError).
    """
    if add < 1:
        raise TokenizerExtensionError(f"--add {add}: the number of tokens to add must be at least 1")
    mlm, data = _check_source(Path(source_dir))
    source, source_dir = mlm.tokenizer, mlm.path  # the directory, also when given its tokenizer.json
    find_inputs(inputs)  # a missing input stops here, before anything is written
    bad = BadRecords()
    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        counted = count_words(_plain(source), iter_documents(inputs, text_field, bad), show_progress)
        if counted.documents == 0:
            raise TokenizerExtensionError(
                f"no text found in {', '.join(map(str, inputs))}"
                + (f" (skipped records: {bad.describe()}; is --text-field {text_field!r} right?)" if bad.counts else "")
            )
        first_id = id_space(source)
        spell = {token_id: source.model.id_to_token(token_id) for word in counted.words for token_id in word}
        taken = set(data["model"]["vocab"]) | set(source.get_vocab(with_added_tokens=True))
        merges = learn_merges(counted.words, spell, taken, first_id, add, min_frequency, show_progress)
        if not merges:
            raise TokenizerExtensionError(
                f"no new token to learn from {', '.join(map(str, inputs))}: no pair of adjacent tokens that would "
                f"spell a token the source lacks occurs at least {min_frequency} times (--min-frequency)"
            )
        extended, padding = extended_tokenizer_json(data, merges, first_id)
        _write(staging, source_dir, extended, padding, model_max_length, len(merges))
        total = first_id + len(merges) + len(padding)
        _check_extension(source_dir, staging, total)
        tokens = count_tokens(
            _plain(load_tokenizer(staging).tokenizer), iter_documents(inputs, text_field), show_progress
        )
    return ExtensionSummary(
        output_dir=Path(output_dir),
        source_dir=source_dir,
        source_vocab_size=first_id,
        vocab_size=total,
        new_tokens=len(merges),
        unused_tokens=len(padding),
        documents=counted.documents,
        bad_records=dict(sorted(bad.counts.items())),
        source_tokens=counted.tokens,
        tokens=tokens,
    )
