"""MLM masking statistics and rules; packing: no truncation, no loss, fixed budget, efficiency."""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_config

from flexbert.core.model import FlexBertForMaskedLM
from flexbert.data.packing import IGNORE_INDEX, GreedyPacker, Masker, MaskingConfig, collate_rows, split_document
from flexbert.typed_config import ConfigError, from_dict

VOCAB, MASK, CLS, SEP = 1000, 4, 1, 2


def make_masker(**overrides):
    special = np.zeros(VOCAB, dtype=bool)
    special[[0, CLS, SEP, 3, MASK]] = True
    return Masker(MaskingConfig(**overrides), MASK, special)


def test_masking_rates_and_split():
    masker = make_masker(mlm_probability=0.3)
    tokens = np.random.default_rng(0).integers(5, VOCAB, 200_000)
    corrupted, labels = masker(tokens, (0, 1, 2, 3))
    selected = labels != IGNORE_INDEX
    assert selected.mean() == pytest.approx(0.3, abs=0.005)
    assert np.array_equal(labels[selected], tokens[selected])
    masked = corrupted[selected] == MASK
    kept = corrupted[selected] == tokens[selected]
    assert masked.mean() == pytest.approx(0.8, abs=0.01)
    assert kept.mean() == pytest.approx(0.1 + 0.1 / VOCAB, abs=0.01)  # random may redraw the same token
    assert np.array_equal(corrupted[~selected], tokens[~selected])
    replaced = corrupted[selected & (corrupted != MASK) & (corrupted != tokens)]
    assert replaced.size and (replaced >= 5).all()  # random replacements are never special tokens


def test_special_tokens_are_never_masked():
    masker = make_masker(mlm_probability=0.9)
    tokens = np.array([CLS, *range(5, 300), SEP, 0, 3] * 50)
    _, labels = masker(tokens, (0,))
    assert (labels[np.isin(tokens, [0, CLS, SEP, 3])] == IGNORE_INDEX).all()


def test_masking_is_reproducible_from_seed_and_identity():
    tokens = np.arange(5, 505)
    a = make_masker(seed=7)(tokens, (0, 1, 42, 0))
    b = make_masker(seed=7)(tokens, (0, 1, 42, 0))
    c = make_masker(seed=7)(tokens, (0, 1, 43, 0))
    d = make_masker(seed=8)(tokens, (0, 1, 42, 0))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1]) and not np.array_equal(a[1], d[1])


@pytest.mark.parametrize(
    "overrides,field",
    [({"mlm_probability": 0.0}, "mlm_probability"), ({"mask_fraction": 0.95, "random_fraction": 0.1}, "mask_fraction")],
)
def test_bad_masking_config(overrides, field):
    with pytest.raises(ConfigError, match=f"masking.{field}"):
        MaskingConfig(**overrides).validate()


def schedule(**section) -> MaskingConfig:
    return from_dict(MaskingConfig, {"mlm_probability": section}, "train_loader.masking")


COSINE = [0.1 + 0.1 * (1 + math.cos(math.pi * progress)) for progress in (0.0, 0.25, 0.5, 0.8, 1.0)]


@pytest.mark.parametrize(
    "section, rates",
    [
        ({"shape": "constant", "value": 0.3}, [0.3] * 5),
        ({"shape": "linear", "start": 0.3, "end": 0.1}, [0.3, 0.25, 0.2, 0.14, 0.1]),
        ({"shape": "cosine", "start": 0.3, "end": 0.1}, COSINE),
        # Each value from its fraction of the phase on: mmBERT's 30%, 15%, 5%, as steps of one phase.
        ({"shape": "steps", "values": [0.3, 0.15, 0.05], "at": [0.5, 0.8]}, [0.3, 0.3, 0.15, 0.05, 0.05]),
    ],
)
def test_mask_rate_schedules_over_a_phase(section, rates):
    masking = schedule(**section)
    assert [masking.rate_at(progress) for progress in (0.0, 0.25, 0.5, 0.8, 1.0)] == pytest.approx(rates)
    assert MaskingConfig(mlm_probability=0.2).rate_at(0.7) == 0.2  # a number is the rate throughout


def test_a_lower_rate_selects_a_subset_of_a_higher_rates_tokens():
    tokens = np.random.default_rng(0).integers(5, VOCAB, 20_000)
    masker = make_masker(seed=3)
    masked = {}
    for rate in (0.3, 0.15, 0.05):
        corrupted, labels = masker.at_rate(rate)(tokens, (0, 1, 2, 3))
        masked[rate] = (labels != IGNORE_INDEX, corrupted == MASK)
        assert masked[rate][0].mean() == pytest.approx(rate, abs=0.01)
    for high, low in ((0.3, 0.15), (0.15, 0.05)):
        for high_positions, low_positions in zip(masked[high], masked[low]):
            assert not (low_positions & ~high_positions).any()  # selected, and turned to [MASK], alike


@pytest.mark.parametrize(
    "section, key, message",
    [
        ({"shape": "linear", "start": 0.3, "end": 1.2}, "end", "must be in (0, 1), got 1.2"),
        ({"shape": "constant", "value": 0.0}, "value", "must be in (0, 1), got 0.0"),
        ({"shape": "steps", "values": [0.3, 0.0], "at": [0.5]}, "values[1]", "must be in (0, 1), got 0.0"),
        ({"shape": "exponential", "start": 0.3, "end": 0.1}, "shape", "must be one of ['constant', 'linear', "),
        ({"shape": "steps", "values": [0.3, 0.2, 0.1], "at": [0.6, 0.4]}, "at", "must increase strictly within (0, 1)"),
        ({"shape": "steps", "values": [0.3, 0.2], "at": [1.0]}, "at", "must increase strictly within (0, 1), got"),
        ({"shape": "steps", "values": [0.3, 0.2], "at": [0.2, 0.5]}, "at", "gives 2 fractions for 2 values"),
        ({"shape": "linear", "start": 0.3}, "end", "missing: a linear schedule takes start and end"),
        ({"shape": "linear", "start": 0.3, "end": 0.1, "value": 0.2}, "value", "a linear schedule does not take value"),
        ({"shape": "cosine", "start": 0.3, "ends": 0.1}, "ends", "unknown key; did you mean 'end'?"),
    ],
)
def test_a_bad_mask_rate_schedule_names_its_key(section, key, message):
    with pytest.raises(ConfigError) as error:
        schedule(**section)
    assert error.value.key_path == f"train_loader.masking.mlm_probability.{key}"
    assert error.value.message.startswith(message), error.value.message


def test_long_documents_are_chunked_not_truncated():
    tokens = np.arange(2500)
    pieces = split_document(0, 9, tokens, row_tokens=1024)
    assert [p.framed_length for p in pieces] == [1024, 1024, 2500 - 2 * 1022 + 2]
    assert np.array_equal(np.concatenate([p.tokens for p in pieces]), tokens)


def test_packer_fills_rows_within_budget_and_loses_nothing():
    # Heavy-tailed lengths like real corpora: many short documents, some many rows long.
    lengths = np.clip(np.random.default_rng(1).lognormal(5.5, 1.2, 2000).astype(int), 1, 20000)
    packer = GreedyPacker(row_tokens=1024, lookahead=256)
    rows = []
    for i, n in enumerate(lengths):
        packer.add(split_document(0, i, np.arange(n), 1024))
        while packer.has_full_lookahead():
            rows.append(packer.pop_row())
    while packer.pending:
        rows.append(packer.pop_row())
    assert all(sum(p.framed_length for p in row) <= 1024 for row in rows)
    covered = {}
    for row in rows:
        for p in row:
            covered.setdefault(p.sample, []).append((p.start, p.end))
    for i, n in enumerate(lengths):  # every document's tokens appear exactly once
        spans = sorted(covered[i])
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    efficiency = sum(p.framed_length for row in rows for p in row) / (1024 * len(rows))
    assert efficiency >= 0.99


def test_collated_batch_runs_in_the_encoder():
    masker = make_masker()
    rows = [
        split_document(0, 0, np.arange(5, 40), 64),
        split_document(0, 1, np.arange(5, 15), 64) + split_document(0, 2, np.arange(5, 8), 64),
    ]
    batch = collate_rows(rows, 64, CLS, SEP, masker)
    assert batch.cu_seqlens.tolist() == [0, 37, 49, 54]
    assert batch.max_seqlen == 37
    assert batch.host_cu_seqlens.tolist() == [0, 37, 49, 54] and batch.row_pieces.tolist() == [0, 1, 3]
    assert batch.masked_index.tolist() == np.flatnonzero(batch.labels.numpy() != IGNORE_INDEX).tolist()
    assert batch.row_masked.tolist() == [0, int((batch.masked_index < 37).sum()), len(batch.masked_index)]
    assert batch.input_ids[[0, 37, 49]].tolist() == [CLS] * 3 and batch.input_ids[[36, 48, 53]].tolist() == [SEP] * 3
    assert batch.packing_efficiency == pytest.approx(54 / 128)
    model = FlexBertForMaskedLM(tiny_config(vocab_size=VOCAB, pad_token_id=3))
    labels = batch.labels.clone()
    labels[5] = batch.input_ids[5] if labels[5] == IGNORE_INDEX else labels[5]
    out = model(batch.input_ids, labels=labels, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
    assert torch.isfinite(out.loss)
