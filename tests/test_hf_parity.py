"""The numerical oracle: transformers' ModernBertForMaskedLM (eager attention) and ours agree, and a
causal model's export and transformers' ModernBertDecoderForCausalLM."""

import json

import pytest
import torch
from conftest import tiny_config

from flexbert.core.hf import export_hf, from_hf, hf_config_from_flexbert
from flexbert.core.model import FlexBertConfig, FlexBertForMaskedLM

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # ModernBERT's own attention pattern and released thetas, window 128 (|i-j| <= 64).
    "modernbert_pattern": dict(
        num_hidden_layers=4, local_attention=128, global_rope_theta=160_000.0, local_rope_theta=10_000.0
    ),
    # Every other layer global, small window, non-default thetas.
    "every_2nd_global": dict(
        num_hidden_layers=5,
        global_attn_every_n_layers=2,
        local_attention=16,
        global_rope_theta=20_000.0,
        local_rope_theta=500.0,
    ),
}


def random_hf_model(config: FlexBertConfig):
    hf_config = hf_config_from_flexbert(config, attn_implementation="eager")
    model = transformers.ModernBertForMaskedLM(hf_config).eval()
    # At the init scale (σ = 0.02) attention is nearly uniform, so positions barely matter and a
    # wrong theta or window would hide below the tolerance. Sharpen it so that they dominate.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attn.Wqkv.weight.mul_(8.0)
    return model


def padded_batch(vocab_size, lengths, seqlen):
    input_ids = torch.randint(3, vocab_size, (len(lengths), seqlen))
    attention_mask = torch.zeros(len(lengths), seqlen, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name):
    config = tiny_config(**CONFIGS[name])
    hf_model = random_hf_model(config)
    ours = from_hf(hf_model, attn_backend="sdpa").eval()
    seqlen = 2 * config.local_attention + 40  # longer than the local window
    lengths = [seqlen, seqlen - 7, config.local_attention + 3, 5]  # several padding lengths
    input_ids, attention_mask = padded_batch(config.vocab_size, lengths, seqlen)
    with torch.no_grad():
        expected = hf_model(input_ids=input_ids, attention_mask=attention_mask).logits
        real = attention_mask.bool()
        for backend in ("eager", "sdpa", "flex"):
            ours.config.attn_backend = backend
            actual = ours(input_ids, attention_mask).logits
            assert actual.shape == expected.shape == (4, seqlen, config.vocab_size)
            diff = (actual[real] - expected[real]).abs().max().item()
            assert diff <= 1e-4, f"{backend}: max abs logit difference {diff:.2e}"
            assert (actual[~real] == 0).all()


@pytest.mark.parametrize(
    "field,value",
    [
        ("global_rope_theta", 10_000.0),
        ("local_rope_theta", 160_000.0),
        ("local_attention", 32),
        ("global_attn_every_n_layers", 2),
    ],
)
def test_oracle_detects_a_wrong_setting(field, value):
    """If ours ran with a different theta or window than transformers, the oracle must notice."""
    config = tiny_config(**CONFIGS["modernbert_pattern"])
    hf_model = random_hf_model(config)
    ours = from_hf(hf_model, attn_backend="sdpa").eval()
    setattr(ours.config, field, value)
    for layer_idx, layer in enumerate(ours.model.layers):
        layer.layer_type = ours.config.layer_type(layer_idx)
    input_ids, attention_mask = padded_batch(config.vocab_size, [300, 250], 300)
    with torch.no_grad():
        expected = hf_model(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = ours(input_ids, attention_mask).logits
    real = attention_mask.bool()
    assert (actual[real] - expected[real]).abs().max() > 1e-3


def test_from_hf_directory_roundtrip(tmp_path):
    config = tiny_config(**CONFIGS["every_2nd_global"])
    hf_model = random_hf_model(config)
    hf_model.save_pretrained(tmp_path)
    ours = from_hf(tmp_path, attn_backend="sdpa")
    assert isinstance(ours, FlexBertForMaskedLM)
    hf_state = hf_model.state_dict()
    for key, tensor in ours.state_dict().items():
        assert torch.equal(tensor, hf_state[key]), key


def test_from_hf_rejects_a_non_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_hf(tmp_path)


@pytest.mark.parametrize("preset", ["modernbert-base", "modernbert-large"])
def test_preset_parameter_count_equals_transformers(preset):
    config = FlexBertConfig.from_dict({"preset": preset})
    with torch.device("meta"):
        ours = FlexBertForMaskedLM(config).num_parameters()
        theirs = sum(
            p.numel() for p in transformers.ModernBertForMaskedLM(hf_config_from_flexbert(config)).parameters()
        )
    assert ours == theirs
    expected_millions = {"modernbert-base": 149.6, "modernbert-large": 395.8}[preset]
    assert round(ours / 1e6, 1) == pytest.approx(expected_millions, abs=0.11)


@pytest.mark.parametrize(
    "blocks,feature",
    [
        ({"norm": "rmsnorm"}, "model.blocks.norm"),
        ({"layer": "postnorm"}, "model.blocks.layer"),
        ({"embeddings": "learned_absolute"}, "model.blocks.embeddings"),
    ],
)
def test_unrepresentable_architectures_are_refused(blocks, feature):
    with pytest.raises(ValueError, match=feature):
        hf_config_from_flexbert(tiny_config(blocks=blocks))


# --- the causal objective: transformers' ModernBertDecoderForCausalLM -------------------------------

DECODER = dict(num_hidden_layers=4, local_attention=16, global_rope_theta=20_000.0, local_rope_theta=20_000.0)


def exported_decoder(tmp_path, local_attention_as_written=None):
    """A random causal model of ours, attention sharpened as in random_hf_model, and transformers'
    model loaded from its export (optionally with config.json's window overwritten: 4.x reads
    local_attention, 5.x the sliding_window derived from it)."""
    torch.manual_seed(0)
    ours = FlexBertForMaskedLM(tiny_config(objective="clm", **DECODER)).eval()
    with torch.no_grad():
        for layer in ours.model.layers:
            layer.attn.Wqkv.weight.mul_(8.0)
    export_hf(ours, tmp_path / "hf")
    if local_attention_as_written is not None:
        config_file = tmp_path / "hf" / "config.json"
        written = json.loads(config_file.read_text())
        window = {"local_attention": local_attention_as_written, "sliding_window": local_attention_as_written // 2}
        config_file.write_text(json.dumps({**written, **window}))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert type(theirs).__name__ == "ModernBertDecoderForCausalLM"
    return ours, theirs


def decoder_logits(ours, theirs, backend):
    seqlen = 3 * DECODER["local_attention"] + 20  # past the local window
    input_ids, attention_mask = padded_batch(ours.config.vocab_size, [seqlen, seqlen - 9, 12], seqlen)
    ours.config.attn_backend = backend
    with torch.no_grad():
        expected = theirs(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = ours(input_ids, attention_mask, return_logits=True).logits
    real = attention_mask.bool()
    return actual[real], expected[real]


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_a_causal_export_has_the_logits_of_transformers_decoder(tmp_path, backend):
    """Sliding windows and padding included, in whichever transformers runs this test (4.x in the
    training environment, 5.x in .venv-newest)."""
    actual, expected = decoder_logits(*exported_decoder(tmp_path), backend)
    assert (actual - expected).abs().max().item() <= 1e-4


def test_the_decoder_oracle_detects_the_window_read_the_other_way(tmp_path):
    """transformers reads local_attention as a window of local_attention // 2 tokens, the query among
    them; written as our own value, its local layers would see one earlier token fewer."""
    ours, theirs = exported_decoder(tmp_path, local_attention_as_written=DECODER["local_attention"])
    actual, expected = decoder_logits(ours, theirs, "sdpa")
    assert (actual - expected).abs().max().item() > 1e-3
