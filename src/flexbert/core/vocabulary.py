"""Growing a model's vocabulary along with its tokenizer.

A tokenizer *extends* another when it keeps every token of the source on the same id and names the
same special tokens on the same ids (``flexbert prepare tokenizer --extend`` writes one). A model
trained with the source then carries over to the extension: its per-token tensors (the token
embedding matrix [V, H], the decoder bias [V]) keep their rows, and each new token starts from the
mean of the rows of the pieces the *source* tokenizer splits its text into, so that it begins near
what the model already makes of that text.

``compare_vocabularies`` tells the training side which case it faces (SAME, EXTENDED or DIFFERENT),
``vocabulary_relation`` and ``check_extension`` refuse a tokenizer that is not an extension, and
``extend_vocabulary_rows`` builds the larger tensor.

Padding tokens, the ``[unusedN]`` tokens that round a vocabulary up to a multiple of 64 as
ModernBERT's do, have no text to take a mean of. A padding row that the source tensor already has
keeps its value; one beyond the source tensor's rows gets the mean of the rows of all the source
tokenizer's ids, a neutral start for a token that should never appear.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from flexbert.core.tokenizer import DEFAULT_SPECIAL_TOKENS, MLMTokenizer, load_tokenizer, special_token_names
from flexbert.errors import FlexBertError
from tokenizers import AddedToken, Tokenizer

SAME, EXTENDED, DIFFERENT = "same", "extended", "different"
# ModernBERT's padding tokens (and flexbert's own tokenizers'): added tokens, not special, named so.
PADDING_TOKEN = re.compile(r"\[unused\d+\]")


class VocabularyError(FlexBertError, ValueError):
    """A tokenizer does not extend the source it is said to extend, or a tensor does not fit them."""


@cache
def byte_level_decoder() -> dict[str, int]:
    """The byte each character of a byte-level BPE token stands for.

    Byte-level BPE (GPT-2's, ModernBERT's) spells each byte as one printable character: the bytes
    that are printable Latin-1 characters stand for themselves, and the others (controls, space,
    soft hyphen ...) take the characters from U+0100 on, in byte order; so a space is "Ġ" (U+0120).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(byte): byte for byte in printable}
    others = sorted(set(range(256)) - set(printable))
    table |= {chr(256 + index): byte for index, byte in enumerate(others)}
    return table


def byte_level_text(token: str) -> str | None:
    """The text a byte-level BPE token spells ("Ġfoo" -> " foo"), or None when its bytes are not
    whole UTF-8 characters (or it is not spelled in byte-level characters at all)."""
    table = byte_level_decoder()
    if not all(char in table for char in token):
        return None
    try:
        return bytes(table[char] for char in token).decode("utf-8")
    except UnicodeDecodeError:
        return None


def id_space(tokenizer: Tokenizer) -> int:
    """How many rows a per-token tensor needs for ``tokenizer``: its largest id + 1 (ids may have holes)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1


def is_byte_level(tokenizer: Tokenizer) -> bool:
    """Whether ``tokenizer`` pre-tokenizes text to bytes, so that its model's tokens spell bytes."""
    pre_tokenizer = json.loads(tokenizer.to_str()).get("pre_tokenizer") or {}
    parts = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    return any(part.get("type") == "ByteLevel" for part in parts)


def is_padding(token: AddedToken) -> bool:
    """Whether an added token only pads the vocabulary (``[unusedN]``, not special)."""
    return not token.special and PADDING_TOKEN.fullmatch(token.content) is not None


@dataclass(frozen=True)
class VocabularyComparison:
    relation: str  # SAME, EXTENDED or DIFFERENT
    source_size: int  # the source's id space (largest id + 1)
    other_size: int  # the other tokenizer's
    reason: str  # DIFFERENT: the first disagreement, in words; otherwise ""


def _added_token_key(token: AddedToken) -> tuple:
    return (token.content, token.special, token.lstrip, token.rstrip, token.normalized, token.single_word)


def _special_ids(tokenizer: MLMTokenizer) -> dict[str, int | None]:
    """Each named special token's id ([UNK] may be missing), by its config key."""
    names = special_token_names(tokenizer.path)
    return {key: tokenizer.tokenizer.token_to_id(names[key]) for key in DEFAULT_SPECIAL_TOKENS}


def _moved_token(source: MLMTokenizer, other: MLMTokenizer, size: int) -> str:
    """Where ``other`` moves, renames or drops a token of ``source``, in words; "" if nowhere."""
    old, new = source.tokenizer, other.tokenizer
    for token_id in range(size):
        was, now = old.id_to_token(token_id), new.id_to_token(token_id)
        if was != now:
            return f"id {token_id} is {was!r} in {source.path} but {now!r} in {other.path}"
    # id_to_token shows one name per id, but the model's vocabulary and the added tokens may give an
    # id a second one (ModernBERT's runs of spaces): every name must still lead to its id.
    new_vocab = new.get_vocab(with_added_tokens=True)
    for token, token_id in sorted(old.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1]):
        if new_vocab.get(token) != token_id:
            return f"token {token!r} has id {token_id} in {source.path} but {new_vocab.get(token)} in {other.path}"
    new_model_vocab = new.get_vocab(with_added_tokens=False)
    for token, token_id in sorted(old.get_vocab(with_added_tokens=False).items(), key=lambda item: item[1]):
        if new_model_vocab.get(token) != token_id:
            return f"model token {token!r} (id {token_id}) of {source.path} is not in the model of {other.path}"
    return ""


def _changed_special(source: MLMTokenizer, other: MLMTokenizer, size: int) -> str:
    """Where ``other`` changes an added or special token of ``source``, in words; "" if nowhere."""
    new_added = other.tokenizer.get_added_tokens_decoder()
    for token_id, token in sorted(source.tokenizer.get_added_tokens_decoder().items()):
        if token_id not in new_added or _added_token_key(new_added[token_id]) != _added_token_key(token):
            return f"added token {token_id} ({token.content!r}) differs between {source.path} and {other.path}"
    old_names, new_names = special_token_names(source.path), special_token_names(other.path)
    for key, (was, now) in zip(
        DEFAULT_SPECIAL_TOKENS, zip(_special_ids(source).values(), _special_ids(other).values())
    ):
        if (old_names[key], was) != (new_names[key], now):
            return (
                f"{key} is {old_names[key]!r} (id {was}) in {source.path} "
                f"but {new_names[key]!r} (id {now}) in {other.path}"
            )
    old_special = other.special_ids & set(range(size))
    if old_special != source.special_ids:
        return (
            f"ids {sorted(old_special ^ source.special_ids)} are special in only one of {source.path} and {other.path}"
        )
    return ""


def compare_tokenizers(source: MLMTokenizer, other: MLMTokenizer) -> VocabularyComparison:
    """``compare_vocabularies`` for tokenizers already loaded."""
    source_size, other_size = id_space(source.tokenizer), id_space(other.tokenizer)
    if other_size < source_size:
        reason = f"{other.path} has {other_size} ids, fewer than the {source_size} of {source.path}"
        return VocabularyComparison(DIFFERENT, source_size, other_size, reason)
    reason = _moved_token(source, other, source_size) or _changed_special(source, other, source_size)
    if reason:
        return VocabularyComparison(DIFFERENT, source_size, other_size, reason)
    old_vocab, new_vocab = source.tokenizer.get_vocab(True), other.tokenizer.get_vocab(True)
    if other_size == source_size and new_vocab != old_vocab:
        extra = sorted(set(new_vocab) - set(old_vocab))[:3]
        reason = f"{other.path} gives existing ids to new tokens ({', '.join(map(repr, extra))})"
        return VocabularyComparison(DIFFERENT, source_size, other_size, reason)
    return VocabularyComparison(SAME if other_size == source_size else EXTENDED, source_size, other_size, "")


def compare_vocabularies(source_dir: str | Path, other_dir: str | Path) -> VocabularyComparison:
    """How the tokenizer at ``other_dir`` stands to the one at ``source_dir``, by their vocabularies.

    SAME: the same tokens on the same ids, and the same special tokens. EXTENDED: every token, added
    token and special token of the source on its id, with its name and flags, and more ids after
    them. DIFFERENT: anything else, with the first disagreement in ``reason``. Only ids and names are
    compared, not how each splits text (merges, normalizer, pre-tokenizer). Raises TokenizerError
    when either is not a tokenizer.
    """
    return compare_tokenizers(load_tokenizer(source_dir), load_tokenizer(other_dir))


def is_extension(source_dir: str | Path, other_dir: str | Path) -> bool:
    """Whether ``other_dir`` keeps every token of ``source_dir`` on its id (the same tokenizer counts)."""
    return compare_vocabularies(source_dir, other_dir).relation != DIFFERENT


def require_extension(source: MLMTokenizer, extended: MLMTokenizer) -> VocabularyComparison:
    """``compare_tokenizers``, raising VocabularyError when ``extended`` does not extend ``source``."""
    comparison = compare_tokenizers(source, extended)
    if comparison.relation == DIFFERENT:
        raise VocabularyError(f"tokenizer {extended.path} does not extend {source.path}: {comparison.reason}")
    return comparison


def check_extension(source_dir: str | Path, extended_dir: str | Path) -> VocabularyComparison:
    """``compare_vocabularies``, raising VocabularyError when ``extended_dir`` does not extend ``source_dir``."""
    return require_extension(load_tokenizer(source_dir), load_tokenizer(extended_dir))


def vocabulary_relation(source_dir: str | Path, other_dir: str | Path) -> str:
    """SAME or EXTENDED: how ``other_dir`` stands to ``source_dir``; VocabularyError when they disagree."""
    return check_extension(source_dir, other_dir).relation


def _pieces_of(
    source: Tokenizer, extended: Tokenizer, added: dict[int, AddedToken], byte_level: bool, token_id: int
) -> list[int]:
    """The source ids a new id's token splits into; [] for padding and for ids no token has.

    ``added`` is ``extended``'s added tokens by id; ``byte_level``: whether its tokens spell bytes.
    """
    if token_id in added:
        return (
            [] if is_padding(added[token_id]) else source.encode(added[token_id].content, add_special_tokens=False).ids
        )
    token = extended.id_to_token(token_id)
    if token is None:
        return []
    text = byte_level_text(token) if byte_level else token
    if text is None:  # bytes that are not whole characters: split the byte symbols themselves
        return [piece.id for piece in source.model.tokenize(token)]
    return source.encode(text, add_special_tokens=False).ids


def token_pieces(source: MLMTokenizer, extended: MLMTokenizer, new_ids: range) -> dict[int, list[int]]:
    """``new_token_pieces`` for tokenizers already loaded, over the ids ``new_ids``."""
    added, byte_level = extended.tokenizer.get_added_tokens_decoder(), is_byte_level(extended.tokenizer)
    pieces = {
        token_id: _pieces_of(source.tokenizer, extended.tokenizer, added, byte_level, token_id) for token_id in new_ids
    }
    return {token_id: ids for token_id, ids in pieces.items() if ids}


def new_token_pieces(source_dir: str | Path, extended_dir: str | Path) -> dict[int, list[int]]:
    """Each new token of ``extended_dir`` (padding left out), as the source ids its text encodes to.

    A byte-level token is first decoded to the text it spells ("Ġfoo" -> " foo"), which the source
    then encodes without special tokens, as it would that text in a document; an added token's text
    is its content. A token whose bytes are not whole UTF-8 characters has no text: the source's own
    BPE model splits its byte symbols instead. Raises VocabularyError unless ``extended_dir``
    extends ``source_dir``.
    """
    source, extended = load_tokenizer(source_dir), load_tokenizer(extended_dir)
    comparison = require_extension(source, extended)
    return token_pieces(source, extended, range(comparison.source_size, comparison.other_size))


def extend_vocabulary_rows(
    rows: torch.Tensor, source_dir: str | Path, extended_dir: str | Path, new_size: int
) -> torch.Tensor:
    """``rows`` [V_old, ...] (a row per source token id) grown to [new_size, ...] for ``extended_dir``.

    Every row that ``rows`` has is copied bitwise, except that a new token's row becomes the mean of
    the rows of its source pieces (``new_token_pieces``); the rows beyond ``rows`` that are no new
    token (padding) get the mean of the rows of the source's ids. Means are taken in at least
    float32 and stored in ``rows.dtype``. Raises VocabularyError when ``extended_dir`` does not
    extend ``source_dir``, when ``rows`` has fewer rows than the source has ids, when ``new_size`` is
    smaller than the extended tokenizer's ids, or when ``rows`` is not floating point.
    """
    source, extended = load_tokenizer(source_dir), load_tokenizer(extended_dir)
    comparison = require_extension(source, extended)
    if rows.shape[0] < comparison.source_size:
        raise VocabularyError(
            f"a tensor of {rows.shape[0]} rows cannot hold the {comparison.source_size} ids of {source_dir}"
        )
    if new_size < comparison.other_size:
        raise VocabularyError(f"new size {new_size} is smaller than the {comparison.other_size} ids of {extended_dir}")
    if not rows.is_floating_point():
        raise VocabularyError(f"per-token rows must be floating point to take means of, not {rows.dtype}")
    pieces = token_pieces(source, extended, range(comparison.source_size, comparison.other_size))
    accumulate = torch.promote_types(rows.dtype, torch.float32)  # bf16 sums would lose digits
    kept = min(rows.shape[0], new_size)
    grown = rows.new_empty((new_size, *rows.shape[1:]))  # [new_size, ...]
    grown[:kept] = rows[:kept]
    grown[kept:] = rows[: comparison.source_size].to(accumulate).mean(dim=0).to(rows.dtype)
    for token_id, piece_ids in pieces.items():
        index = torch.tensor(piece_ids, dtype=torch.long, device=rows.device)  # [pieces]
        grown[token_id] = rows.index_select(0, index).to(accumulate).mean(dim=0).to(rows.dtype)
    return grown
