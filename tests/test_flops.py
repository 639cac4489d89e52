"""Model FLOPs of a training step: the spec's anchors, a hand count, and per-document exactness."""

import pytest
import torch
from conftest import tiny_config

from flexbert.core.model import FlexBertConfig
from flexbert.train.flops import TrainingFlops, batch_training_flops, training_flops_per_token


def unpadded(lengths, predicted_every=None):
    """cu_seqlens and labels of documents with these lengths; every n-th token predicted."""
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    labels = torch.full((sum(lengths),), -100)
    if predicted_every:
        labels[::predicted_every] = 7
    return cu_seqlens, labels


@pytest.mark.parametrize("preset,expected", [("modernbert-base", 825e6), ("modernbert-large", 2.31e9)])
def test_spec_anchors_at_1024_with_30_percent_masking(preset, expected):
    config = FlexBertConfig.from_dict({"preset": preset})
    assert training_flops_per_token(config, 1024, 0.3) == pytest.approx(expected, rel=2e-3)


def test_tiny_batch_matches_a_hand_count():
    # H=64, I=96, V=256, 4 layers: 0 and 3 global, 1 and 2 local with 16 + 1 keys.
    config = tiny_config()
    cu_seqlens, labels = unpadded([5, 30])
    labels[[0, 9, 20, 34]] = 7
    per_token = 6 * 4 * (4 * 64**2 + 3 * 64 * 96)  # 835,584
    # sum over documents of S·(n_global·S + n_local·min(17, S)): 5·(2·5 + 2·5) + 30·(2·30 + 2·17)
    attention = 12 * 64 * (5 * 20 + 30 * 94)  # 2,242,560
    head = 6 * (64**2 + 256 * 64) * 4  # 4 predicted tokens: 491,520
    assert per_token * 35 + attention + head == 31_979_520
    assert batch_training_flops(config, cu_seqlens, labels) == 31_979_520


def test_documents_not_rows_set_the_attention_cost():
    # 4 documents of 32 tokens cost 4 x one document of 32, however they were packed into rows.
    config = tiny_config()
    one = batch_training_flops(config, *unpadded([32], predicted_every=4))
    four = batch_training_flops(config, *unpadded([32] * 4, predicted_every=4))
    assert four == 4 * one
    # A single 128-token document attends further in its global layers, so it costs more.
    assert batch_training_flops(config, *unpadded([128], predicted_every=4)) > four


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_uniform_helper_agrees_with_the_batch_count(objective):
    config = tiny_config(objective=objective)
    for length in (8, 17, 100):  # shorter than, equal to and longer than the local window
        cu_seqlens, labels = unpadded([length] * 6, predicted_every=5)
        fraction = (labels != -100).sum().item() / labels.numel()
        per_token = batch_training_flops(config, cu_seqlens, labels) / labels.numel()
        assert per_token == pytest.approx(training_flops_per_token(config, length, fraction), rel=1e-12)


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_the_attention_term_counts_the_pairs_the_attention_mask_allows(objective):
    """The attention FLOPs are 12·H per (query, key) pair that some layer scores; the pairs counted
    here from the mask itself, document by document and layer by layer. A causal model's are about
    half an encoder's."""
    config = tiny_config(objective=objective, num_hidden_layers=3, local_attention=8)
    lengths = [1, 4, 5, 6, 40]
    pairs = 0
    for length in lengths:
        position = torch.arange(length)
        behind = position[:, None] - position[None, :]  # i - j
        for layer in range(config.num_hidden_layers):
            allowed = torch.ones(length, length, dtype=torch.bool)
            if not config.is_global_layer(layer):
                allowed &= behind.abs() <= config.local_half_window
            if objective == "clm":
                allowed &= behind >= 0
            pairs += int(allowed.sum())
    cu_seqlens, labels = unpadded(lengths, predicted_every=3)
    costs = TrainingFlops.of(config)
    without_attention = costs.per_token * labels.numel() + costs.per_prediction * int((labels != -100).sum())
    attention = batch_training_flops(config, cu_seqlens, labels) - without_attention
    if objective == "mlm":  # an encoder's local queries are counted at the full window (an upper bound)
        assert attention >= 12 * config.hidden_size * pairs
    else:
        assert attention == 12 * config.hidden_size * pairs


def test_plain_mlp_counts_two_matrices_and_glu_three():
    glu, plain = tiny_config(), tiny_config(blocks={"mlp": "mlp"})
    difference = training_flops_per_token(glu, 64, 0.3) - training_flops_per_token(plain, 64, 0.3)
    assert difference == 6 * 4 * 64 * 96  # one H x I matrix per layer, 6 FLOPs per weight


def test_without_sparse_prediction_every_token_goes_through_the_head():
    config = tiny_config(sparse_prediction=False)
    costs = TrainingFlops.of(config)
    cu_seqlens, labels = unpadded([10, 10])
    unlabelled = batch_training_flops(config, cu_seqlens, labels)
    labels[:] = 7
    assert batch_training_flops(config, cu_seqlens, labels) == unlabelled
    assert training_flops_per_token(config, 10, 0.0) == costs.per_token_at(10, 1.0)
