"""Training a tokenizer with ModernBERT's layout.

The vocabulary is a byte-level BPE, then [UNK] [CLS] [SEP] [PAD] [MASK] on consecutive ids, then
``[unused0]``, ``[unused1]``, ... up to a multiple of 64 (so the embedding matrix tiles evenly on
GPUs). Encoding frames a text as ``[CLS] A [SEP]`` and a pair as ``[CLS] A [SEP] B [SEP]``.
[MASK] absorbs the space before it (lstrip), as a masked word that began with a space would have.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from flexbert.core.atomic_output import atomic_output_dir
from flexbert.core.sources import BadRecords, iter_documents
from flexbert.core.tokenizer import DEFAULT_SPECIAL_TOKENS
from flexbert.errors import FlexBertError
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKEN_ORDER = ("unk_token", "cls_token", "sep_token", "pad_token", "mask_token")
SPECIAL_TOKENS = tuple(DEFAULT_SPECIAL_TOKENS[key] for key in SPECIAL_TOKEN_ORDER)
VOCAB_MULTIPLE = 64
BYTE_ALPHABET = 256  # byte-level BPE starts from every byte, whatever the corpus
DEFAULT_VOCAB_SIZE = 50368  # ModernBERT's
DEFAULT_MODEL_MAX_LENGTH = 8192  # ModernBERT's context


class TokenizerTrainingError(FlexBertError, ValueError):
    """Training cannot be done as asked: a vocabulary too small for the byte alphabet, or no text."""


@dataclass(frozen=True)
class TrainingSummary:
    output_dir: Path
    vocab_size: int  # everything: BPE + special + unused
    bpe_vocab_size: int
    unused_tokens: int
    documents: int
    bad_records: dict[str, int]  # skipped records by reason (see sources.BAD_REASONS)


def padded_vocab_size(requested: int) -> int:
    """``requested`` rounded up to a multiple of 64, after checking it leaves room for a merge."""
    smallest = BYTE_ALPHABET + len(SPECIAL_TOKENS) + 1
    if requested < smallest:
        raise TokenizerTrainingError(
            f"vocab size {requested} is too small: it must exceed {smallest - 1} "
            f"(the {BYTE_ALPHABET} byte symbols plus {len(SPECIAL_TOKENS)} special tokens)"
        )
    return -(-requested // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def train_bpe(
    documents: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2, show_progress: bool = True
) -> Tokenizer:
    """A byte-level BPE tokenizer trained on ``documents``, with ModernBERT's special tokens and template.

    Its total vocabulary is ``padded_vocab_size(vocab_size)``: BPE gets all of it but the special
    tokens, and [unused*] tokens fill whatever a small corpus leaves the BPE unable to learn.
    """
    total = padded_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=total - len(SPECIAL_TOKENS),
        min_frequency=min_frequency,
        show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(documents, trainer)
    # The pre-tokenizer splits "[" and "]" from the letters between them, so no learned token can
    # spell a special token: each gets a new id, in order, right after the BPE vocabulary.
    tokenizer.add_special_tokens(
        [
            AddedToken(token, lstrip=token == DEFAULT_SPECIAL_TOKENS["mask_token"], normalized=False, special=True)
            for token in SPECIAL_TOKENS
        ]
    )
    unused = total - tokenizer.get_vocab_size(with_added_tokens=True)
    tokenizer.add_tokens([AddedToken(f"[unused{index}]", special=False) for index in range(unused)])
    cls, sep = DEFAULT_SPECIAL_TOKENS["cls_token"], DEFAULT_SPECIAL_TOKENS["sep_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B {sep}",
        special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))],
    )
    return tokenizer


def save_tokenizer(
    tokenizer: Tokenizer, directory: str | Path, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH
) -> None:
    """Write ``tokenizer`` as a Hugging Face tokenizer directory (``AutoTokenizer`` and ``load_tokenizer`` read it)."""
    directory = Path(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    special_tokens = {key: DEFAULT_SPECIAL_TOKENS[key] for key in SPECIAL_TOKEN_ORDER}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens,
        "model_max_length": model_max_length,
        "model_input_names": ["input_ids", "attention_mask"],
        # Byte-level decoding already restores the text exactly; the clean-up would then rewrite it
        # ("don 't" -> "don't").
        "clean_up_tokenization_spaces": False,
    }
    for filename, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special_tokens)):
        (directory / filename).write_text(json.dumps(content, indent=2) + "\n")


def train_tokenizer(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    text_field: str = "text",
    min_frequency: int = 2,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    overwrite: bool = False,
    show_progress: bool = True,
) -> TrainingSummary:
    """Train on the corpus files and folders ``inputs`` and save the tokenizer to ``output_dir`` atomically.

    ``inputs`` are read as ``sources.iter_documents`` reads them; records that give no document are
    skipped and counted. A ValueError subclass names the problem for a missing or unreadable input
    (SourceError), a corpus without text or an impossible ``vocab_size`` (TokenizerTrainingError),
    or an occupied ``output_dir`` without ``overwrite`` (OutputExistsError); ``output_dir`` is then
    left as it was.
    """
    bad = BadRecords()
    count = 0

    def counted() -> Iterator[str]:
        nonlocal count
        for text in iter_documents(inputs, text_field, bad):
            if text.strip():  # blank documents teach BPE nothing, so they are not counted either
                count += 1
                yield text

    with atomic_output_dir(output_dir, overwrite=overwrite) as staging:
        tokenizer = train_bpe(counted(), vocab_size, min_frequency, show_progress)
        if count == 0:
            raise TokenizerTrainingError(
                f"no text found in {', '.join(map(str, inputs))}"
                + (f" (skipped records: {bad.describe()}; is --text-field {text_field!r} right?)" if bad.counts else "")
            )
        save_tokenizer(tokenizer, staging, model_max_length)
    total = tokenizer.get_vocab_size(with_added_tokens=True)
    bpe = tokenizer.token_to_id(SPECIAL_TOKENS[0])  # the special tokens start where BPE ends
    return TrainingSummary(
        output_dir=Path(output_dir),
        vocab_size=total,
        bpe_vocab_size=bpe,
        unused_tokens=total - bpe - len(SPECIAL_TOKENS),
        documents=count,
        bad_records=dict(sorted(bad.counts.items())),
    )
