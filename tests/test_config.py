"""Config validation: each bad value gets one clear error naming its field."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexbert.core.model import FlexBertConfig, FlexBertForMaskedLM
from flexbert.typed_config import ConfigError
from flexbert.yaml_config import load_yaml_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "values,key_path,message",
    [
        ({"hidden_sizee": 768}, "model.hidden_sizee", "unknown key"),
        ({"blocks": {"mlpp": "glu"}}, "model.blocks.mlpp", "unknown key"),
        ({"hidden_size": 100, "num_attention_heads": 12}, "model.hidden_size", "not divisible"),
        ({"hidden_size": 60, "num_attention_heads": 4}, "model.num_attention_heads", "odd"),
        ({"local_attention": 127}, "model.local_attention", "even"),
        ({"pad_token_id": 50368}, "model.pad_token_id", "outside the vocabulary"),
        ({"vocab_size": 1000}, "model.pad_token_id", "outside the vocabulary"),
        ({"cls_token_id": -1}, "model.cls_token_id", "outside the vocabulary"),
        ({"attn_backend": "xformers"}, "model.attn_backend", "unknown backend"),
        ({"hidden_size": "768"}, "model.hidden_size", "expected an integer"),
        ({"norm_bias": "no"}, "model.norm_bias", "expected a boolean"),
        ({"blocks": {"mlp": "geglu"}}, "model.blocks.mlp", "registered: glu, mlp"),
        (
            {"blocks": {"mlp": {"name": "swiglu", "multiple_of": "8"}}},
            "model.blocks.mlp.multiple_of",
            "expected an integer",
        ),
        ({"blocks": {"mlp": {"name": "glu", "multiple_of": 8}}}, "model.blocks.mlp.multiple_of", "takes no options"),
        ({"hidden_activation": "gelu_fast"}, "model.hidden_activation", "must be one of \\['gelu'"),
        ({"global_rope_theta": -1}, "model.global_rope_theta", "must be > 0"),
        ({"preset": "modernbert-huge"}, "model.preset", "unknown preset"),
        ({"plugins": ["no_such_module_xyz"]}, "model.plugins[0]", "cannot import"),
    ],
)
def test_bad_value_names_its_field(values, key_path, message):
    with pytest.raises(ConfigError, match=message) as info:
        FlexBertConfig.from_dict(values)
    assert info.value.key_path == key_path
    assert str(info.value).startswith(key_path + ":")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_without_flash_attn_is_refused():
    with pytest.raises(ConfigError, match="needs the flash-attn package") as info:
        FlexBertConfig.from_dict({"attn_backend": "flash"})
    assert info.value.key_path == "model.attn_backend"


def test_flex_refuses_attention_probability_dropout():
    with pytest.raises(ConfigError, match="FlexAttention cannot drop"):
        FlexBertConfig.from_dict({"attn_backend": "flex", "attention_probs_dropout": 0.1})


def test_preset_keys_can_be_overridden():
    config = FlexBertConfig.from_dict(
        {"preset": "modernbert-large", "num_hidden_layers": 2, "blocks": {"norm": "rmsnorm"}}
    )
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (1024, 2, 2624)
    assert config.blocks.norm == "rmsnorm" and config.blocks.mlp == "glu"


@pytest.mark.parametrize("path", sorted((ROOT / "yamls" / "model").glob("*.yaml")), ids=lambda p: p.name)
def test_model_yamls_validate_and_build(path):
    config = FlexBertConfig.from_dict(load_yaml_config(path)["model"])
    with torch.device("meta"):
        assert FlexBertForMaskedLM(config).num_parameters() > 100e6


def test_yaml_overrides_and_errors(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  preset: modernbert-base\n")
    raw = load_yaml_config(good, ["model.num_hidden_layers=3"])
    assert FlexBertConfig.from_dict(raw["model"]).num_hidden_layers == 3
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  preset: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml_config(broken)
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_yaml_config(good, ["model.num_hidden_layers"])


def test_describe_validates_a_model_section():
    describe = [sys.executable, "-m", "flexbert.cli", "describe", "yamls/model/modernbert-base.yaml"]
    ok = subprocess.run([*describe, "model.num_hidden_layers=2"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "layers 2 (G = global, L = local window 128): GL" in ok.stdout
    bad = subprocess.run([*describe, "model.hiden_size=2"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "model.hiden_size: unknown key; did you mean 'hidden_size'?" in bad.stderr
