"""Centre tiling with wraparound (flexbert.core.model.tiling): the rule cell by cell, per fused part and
per layer, where it preserves weights, that training starts from its result, and what it refuses."""

import pytest
import torch
from conftest import tiny_config

from flexbert.core.model import FlexBertForMaskedLM
from flexbert.core.model.tiling import source_layer, tile_into, tile_state_dict, tile_tensor

SMALL = dict(vocab_size=64, hidden_size=16, num_attention_heads=2, intermediate_size=24, num_hidden_layers=2)
# Width grows by an even amount (8: offset 4) and the MLP by an odd one (13: offset 6, one more cell after).
LARGE = dict(SMALL, hidden_size=24, num_attention_heads=3, intermediate_size=37, num_hidden_layers=5)


def random_weights(config) -> dict[str, torch.Tensor]:
    """A model's state dict with every parameter (norms and biases too) random, so that no two cells
    are alike by accident; the decoder stays tied to the embeddings."""
    model = FlexBertForMaskedLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    return model.state_dict()


def wrap_centred(values: list, new: int) -> list:
    """The rule in words, cell by cell: the values at the centre; past their end, continue cyclically
    from their start; before their start, continue cyclically backwards from their end."""
    old = len(values)
    start = (new - old) // 2
    out = [None] * new
    out[start : start + old] = values
    for j in range(start + old, new):
        out[j] = values[(j - start - old) % old]
    for j in range(start - 1, -1, -1):
        out[j] = values[old - 1 - (start - 1 - j) % old]
    return out


def transpose(matrix: list[list]) -> list[list]:
    return [list(column) for column in zip(*matrix)]


def wrap_matrix(matrix: list[list], rows: int, columns: int, columns_first: bool) -> list[list]:
    """The rule in words applied to each row, then to each column of the result (or the other way)."""
    if columns_first:
        widened = [wrap_centred(row, columns) for row in matrix]
        return transpose([wrap_centred(column, rows) for column in transpose(widened)])
    lengthened = transpose([wrap_centred(column, rows) for column in transpose(matrix)])
    return [wrap_centred(row, columns) for row in lengthened]


def test_one_dimension_matches_the_rule_cell_by_cell():
    small = torch.arange(5.0)
    for new in (5, 6, 12, 13, 17):
        offset = (new - 5) // 2
        large = tile_tensor(small, (new,))
        assert large.tolist() == wrap_centred(small.tolist(), new)
        assert torch.equal(large[offset : offset + 5], small)
        assert large.tolist() == [small[(j - offset) % 5].item() for j in range(new)]


def test_two_dimensions_match_the_rule_in_either_order():
    small = torch.randn(5, 3)
    large = tile_tensor(small, (12, 8))
    assert torch.equal(large[3:8, 2:5], small)  # offsets (12 - 5) // 2 = 3 and (8 - 3) // 2 = 2
    for columns_first in (True, False):
        assert large.tolist() == wrap_matrix(small.tolist(), 12, 8, columns_first)


def test_fused_projections_are_tiled_per_part():
    small_config = tiny_config(**SMALL, attention_bias=True, mlp_bias=True)
    large_config = tiny_config(**LARGE, attention_bias=True, mlp_bias=True)
    small = random_weights(small_config)
    large = tile_state_dict(small, small_config, large_config)
    column = (24 - 16) // 2  # both projections read the hidden size: 16 -> 24
    for layer in range(5):
        src = source_layer(layer, 2, 5)
        # name, parts, rows per part (small, large): Wqkv [3H, H] as Q|K|V, the GLU's Wi [2I, H] as input|gate
        for name, parts, (small_rows, large_rows) in (("attn.Wqkv", 3, (16, 24)), ("mlp.Wi", 2, (24, 37))):
            weight = large[f"model.layers.{layer}.{name}.weight"]
            bias = large[f"model.layers.{layer}.{name}.bias"]
            small_weight = small[f"model.layers.{src}.{name}.weight"]
            small_bias = small[f"model.layers.{src}.{name}.bias"]
            row = (large_rows - small_rows) // 2
            for part in range(parts):
                # Each part of the large projection holds the same part of the small one at its centre.
                centre = weight.chunk(parts)[part][row : row + small_rows, column : column + 16]
                assert torch.equal(centre, small_weight.chunk(parts)[part])
                assert torch.equal(bias.chunk(parts)[part][row : row + small_rows], small_bias.chunk(parts)[part])
            assert not torch.equal(weight, tile_tensor(small_weight, weight.shape))  # tiling whole would mix parts


def test_plain_mlp_wi_is_tiled_whole():
    small_config = tiny_config(**SMALL, blocks={"mlp": "mlp"})
    large_config = tiny_config(**LARGE, blocks={"mlp": "mlp"})
    small = random_weights(small_config)
    large = tile_state_dict(small, small_config, large_config)
    assert torch.equal(
        large["model.layers.0.mlp.Wi.weight"], tile_tensor(small["model.layers.0.mlp.Wi.weight"], (37, 24))
    )


def test_layers_copy_the_rounded_source_layer():
    # round() rounds halves to even, as the reference: 2 -> 4 maps layer 1 (0.5) to 0 and layer 3 (1.5)
    # to 2, clamped to 1. ModernBERT base -> large (22 -> 28): layer 21 (16.5) copies 16.
    assert [source_layer(i, 2, 4) for i in range(4)] == [0, 0, 1, 1]
    assert [source_layer(i, 2, 5) for i in range(5)] == [0, 0, 1, 1, 1]
    assert [source_layer(i, 22, 28) for i in (7, 21, 27)] == [6, 16, 21]
    small_config, large_config = tiny_config(**SMALL), tiny_config(**LARGE)
    small = random_weights(small_config)
    large = tile_state_dict(small, small_config, large_config)
    for layer, src in enumerate([0, 0, 1, 1, 1]):
        for name in ("attn.Wo.weight", "mlp.Wo.weight", "mlp_norm.weight"):
            expected = tile_tensor(small[f"model.layers.{src}.{name}"], large[f"model.layers.{layer}.{name}"].shape)
            assert torch.equal(large[f"model.layers.{layer}.{name}"], expected)
    # Small layer 0 has no attention norm (the embedding norm precedes it): layer 1, its copy, gets a fresh one.
    assert "model.layers.0.attn_norm.weight" not in large
    assert torch.equal(large["model.layers.1.attn_norm.weight"], torch.ones(24))


def test_same_size_is_the_identity_but_for_a_fresh_final_norm_and_the_decoder_stays_tied():
    # As the reference: every weight tiled (here copied), the encoder's final norm left as
    # initialisation makes it.
    config = tiny_config(**SMALL, norm_bias=True, attention_bias=True, mlp_bias=True, head_bias=True)
    small = random_weights(config)
    large = tile_state_dict(small, config, config)
    assert large.keys() == small.keys()
    final_norm = {"model.final_norm.weight", "model.final_norm.bias"}
    assert final_norm < large.keys()
    assert all(torch.equal(large[key], small[key]) for key in small.keys() - final_norm)
    assert (
        torch.equal(large["model.final_norm.weight"], torch.ones(16))
        and not small["model.final_norm.weight"].eq(1).all()
    )
    assert torch.equal(large["model.final_norm.bias"], torch.zeros(16))
    assert large["decoder.weight"] is large["model.embeddings.tok_embeddings.weight"]


def test_more_layers_at_the_same_width_copies_each_layer_unchanged():
    small_config, large_config = tiny_config(**SMALL), tiny_config(**dict(SMALL, num_hidden_layers=4))
    small = random_weights(small_config)
    large = tile_state_dict(small, small_config, large_config)
    for key, value in small.items():
        if not key.startswith(("model.layers.", "model.final_norm.")):
            assert torch.equal(large[key], value), key
    for layer in range(4):
        prefix = f"model.layers.{source_layer(layer, 2, 4)}."
        for key, value in small.items():
            if key.startswith(prefix):
                assert torch.equal(large[f"model.layers.{layer}." + key.removeprefix(prefix)], value), key


def test_training_starts_from_the_tiled_model():
    small_config, large_config = tiny_config(**SMALL), tiny_config(**LARGE)
    small_model = FlexBertForMaskedLM(small_config)
    large_model = tile_into(FlexBertForMaskedLM(large_config), small_model.state_dict(), small_config)
    assert large_model.decoder.weight is large_model.model.embeddings.tok_embeddings.weight
    input_ids = torch.randint(3, 64, (2, 12))
    labels = torch.where(torch.rand(2, 12) < 0.5, input_ids, -100)
    optimizer = torch.optim.AdamW(large_model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss = large_model(input_ids, labels=labels).loss
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(hidden_size=8, num_attention_heads=1), "hidden_size: the large model's 8 is smaller"),
        (dict(intermediate_size=16), "intermediate_size"),
        (dict(num_hidden_layers=1), "num_hidden_layers"),
        (dict(vocab_size=128), "vocab_size: the large model's 128 differs"),
        (dict(blocks={"norm": "rmsnorm"}), "blocks.norm: the large model's 'rmsnorm' differs"),
        (dict(norm_bias=True), "the small weights have no model.embeddings.norm.bias"),
        (dict(decoder_bias=False), "no place for the small weights' decoder.bias"),
    ],
)
def test_refuses_what_cannot_be_tiled(change, message):
    small_config = tiny_config(**SMALL)
    with pytest.raises(ValueError, match=message):
        tile_state_dict(random_weights(small_config), small_config, tiny_config(**dict(LARGE, **change)))
