"""Loading a tokenizer directory (ours or any Hugging Face one) with the special tokens MLM needs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flexbert.errors import FlexBertError
from tokenizers import Tokenizer

# ModernBERT's special tokens; a directory's tokenizer_config.json / special_tokens_map.json can
# name others (e.g. "<mask>").
DEFAULT_SPECIAL_TOKENS = {
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "mask_token": "[MASK]",
}
REQUIRED_FOR_MLM = ("cls_token", "sep_token", "pad_token", "mask_token")


class TokenizerError(FlexBertError, ValueError):
    """A tokenizer directory is missing, unreadable, or lacks a token MLM needs."""


@dataclass(frozen=True)
class MLMTokenizer:
    tokenizer: Tokenizer
    path: Path
    vocab_size: int  # including added tokens
    cls_id: int
    sep_id: int
    pad_id: int
    mask_id: int
    special_ids: frozenset[int]  # never masked, never drawn as random replacements

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without [CLS]/[SEP]: the packer frames each piece itself."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def special_mask(self) -> np.ndarray:
        """bool [vocab_size]: True at special-token ids."""
        table = np.zeros(self.vocab_size, dtype=bool)
        table[list(self.special_ids)] = True
        return table


def special_token_names(directory: Path) -> dict[str, str]:
    """The special tokens' names by key ("cls_token": "[CLS]" ...), as the directory's config files give them."""
    names = dict(DEFAULT_SPECIAL_TOKENS)
    for filename in ("special_tokens_map.json", "tokenizer_config.json"):
        file = directory / filename
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise TokenizerError(f"{file}: unreadable ({err})") from None
        for key in DEFAULT_SPECIAL_TOKENS:
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                names[key] = value
    return names


def load_tokenizer(path: str | Path) -> MLMTokenizer:
    """Load ``path`` (a directory holding tokenizer.json, or the file itself) for MLM."""
    path = Path(path)
    directory, file = (path.parent, path) if path.suffix == ".json" else (path, path / "tokenizer.json")
    if not file.is_file():
        raise TokenizerError(f"tokenizer not found: {file} does not exist")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust library raises its own exception type
        raise TokenizerError(f"{file}: not a valid tokenizers file ({err})") from None
    names = special_token_names(directory)
    ids = {}
    for key in DEFAULT_SPECIAL_TOKENS:
        ids[key] = tokenizer.token_to_id(names[key])
    missing = [f"{key.removesuffix('_token')} token {names[key]!r}" for key in REQUIRED_FOR_MLM if ids[key] is None]
    if missing:
        raise TokenizerError(
            f"tokenizer {directory} has no {' and no '.join(missing)}; MLM needs [CLS], [SEP], [PAD] and [MASK] tokens"
        )
    special_ids = {token_id for token_id in ids.values() if token_id is not None}
    special_ids |= {token_id for token_id, added in tokenizer.get_added_tokens_decoder().items() if added.special}
    return MLMTokenizer(
        tokenizer=tokenizer,
        path=directory,
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        cls_id=ids["cls_token"],
        sep_id=ids["sep_token"],
        pad_id=ids["pad_token"],
        mask_id=ids["mask_token"],
        special_ids=frozenset(special_ids),
    )
