"""Registries: lookup, clear errors, user blocks from a config import path or an entry point, CLI,
block options, and the contract that every registered block keeps."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import tiny_config

import flexbert.registry as registry_module
from flexbert.cli import main as cli_main
from flexbert.core.model import FlexBertConfig, FlexBertForMaskedLM
from flexbert.core.model.init import ResidualProjection
from flexbert.core.model.registries import BLOCK_REGISTRIES, MLP, NORM
from flexbert.registry import CATALOGUE, Registry, RegistryError
from flexbert.typed_config import ConfigError

USER_BLOCK = """
import torch.nn as nn
from flexbert.core.model.registries import MLP

@MLP.register("{name}")
class ScaledMLP(nn.Module):
    '''A user MLP that doubles its input.'''

    def __init__(self, config):
        super().__init__()
        self.Wo = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        return 2 * self.Wo(x)
"""


def test_every_block_family_has_a_registry_with_the_modernbert_default():
    assert set(BLOCK_REGISTRIES) == {"embeddings", "attention", "mlp", "norm", "layer", "head", "init", "loss"}
    defaults = tiny_config().blocks
    for slot, registry in BLOCK_REGISTRIES.items():
        assert getattr(defaults, slot) in registry.names()


def test_unknown_name_lists_the_registered_names():
    with pytest.raises(RegistryError, match=r"unknown norm 'batchnorm'; registered norm names: layernorm, rmsnorm"):
        NORM.get("batchnorm")


def test_registering_a_taken_name_fails():
    with pytest.raises(RegistryError, match="already registered"):
        MLP.add("glu", lambda config: None)
    with pytest.raises(TypeError, match="must be callable"):
        Registry("scratch_family", "f()", "scratch").add("x", 42)


def test_user_block_from_a_config_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_blocks.py").write_text(USER_BLOCK.format(name="scaled_from_config"))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tiny_config(plugins=["my_blocks"], blocks={"mlp": "scaled_from_config"})
    model = FlexBertForMaskedLM(config)
    assert type(model.model.layers[0].mlp).__name__ == "ScaledMLP"
    assert model(torch.randint(3, 256, (1, 10))).logits.shape == (1, 10, 256)


def test_user_block_from_an_entry_point(tmp_path, monkeypatch):
    (tmp_path / "ep_blocks.py").write_text(USER_BLOCK.format(name="scaled_from_entry_point"))
    dist = tmp_path / "ep_blocks-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-blocks\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[flexbert.plugins]\nep_blocks = ep_blocks\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry_module, "_entry_points_loaded", False)
    assert "scaled_from_entry_point" in MLP.names()
    model = FlexBertForMaskedLM(tiny_config(blocks={"mlp": "scaled_from_entry_point"}))
    assert type(model.model.layers[0].mlp).__name__ == "ScaledMLP"


def test_cli_lists_every_registry_and_entry(capsys):
    assert cli_main(["registry"]) == 0
    out = capsys.readouterr().out
    for registry in CATALOGUE:
        assert f"{registry.family}:" in out
        for name in registry.names():
            assert f"- {name} " in out


def test_cli_registry_with_a_plugin_and_a_bad_plugin(tmp_path, monkeypatch, capsys):
    (tmp_path / "cli_blocks.py").write_text(USER_BLOCK.format(name="scaled_for_cli"))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli_main(["registry", "mlp", "--plugins", "cli_blocks"]) == 0
    out = capsys.readouterr().out
    assert "scaled_for_cli" in out and "A user MLP that doubles its input." in out
    assert "norm:" not in out
    assert cli_main(["registry", "--plugins", "missing_plugin_xyz"]) == 2
    assert "cannot import plugin module 'missing_plugin_xyz'" in capsys.readouterr().err


def test_console_script_runs():
    script = Path(sys.executable).with_name("flexbert")
    result = subprocess.run([script, "registry", "attention_backend"], capture_output=True, text=True, check=True)
    assert result.stdout.count("\n  - ") == 5  # eager, flash, flash3, flex, sdpa


# --- block options ----------------------------------------------------------------------------------


@dataclasses.dataclass
class ProbeOptions:
    gain: float = 1.0


@MLP.register("probe_out_proj", options=ProbeOptions)
class ProbeMLP(nn.Module):
    """A test plugin with an option, whose residual output projection is called out_proj."""

    def __init__(self, config: FlexBertConfig, options: ProbeOptions):
        super().__init__()
        self.gain = options.gain
        self.in_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.out_proj = ResidualProjection(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.gain * self.out_proj(torch.relu(self.in_proj(hidden)))


def test_registries_state_their_factory_protocols():
    assert MLP.signature == "factory(config) -> module(hidden[..., H]) -> hidden[..., H]"
    assert BLOCK_REGISTRIES["attention"].signature.startswith("factory(config, layer_idx) -> module(")


@pytest.mark.parametrize(
    "mlp,key_path,message",
    [
        (
            {"name": "swiglu", "multiple_off": 8},
            "model.blocks.mlp.multiple_off",
            "unknown key; did you mean 'multiple_of'",
        ),
        ({"name": "swiglu", "multiple_of": "8"}, "model.blocks.mlp.multiple_of", "expected an integer"),
        ({"name": "swiglu", "multiple_of": 0}, "model.blocks.mlp.multiple_of", "must be positive, got 0"),
        ({"name": "glu", "multiple_of": 8}, "model.blocks.mlp.multiple_of", "mlp 'glu' takes no options"),
        ({"multiple_of": 8}, "model.blocks.mlp.name", "a choice given as a mapping names its entry"),
        ({"name": "swigluu"}, "model.blocks.mlp", "unknown mlp 'swigluu'; registered: glu, mlp"),
        (["swiglu"], "model.blocks.mlp", "expected str or dict"),
    ],
)
def test_block_options_are_checked_against_the_block_by_key_path(mlp, key_path, message):
    with pytest.raises(ConfigError, match=message) as info:
        FlexBertConfig.from_dict({"blocks": {"mlp": mlp}})
    assert info.value.key_path == key_path


def test_a_plugin_receives_its_options():
    model = FlexBertForMaskedLM(tiny_config(blocks={"mlp": {"name": "probe_out_proj", "gain": 0.5}}))
    assert model.model.layers[0].mlp.gain == 0.5
    assert FlexBertForMaskedLM(tiny_config(blocks={"mlp": "probe_out_proj"})).model.layers[0].mlp.gain == 1.0


def test_block_options_round_trip_through_asdict_and_json():
    """Checkpoints store ``dataclasses.asdict(config)`` and rebuild the model from it."""
    config = tiny_config(
        blocks={"mlp": {"name": "swiglu", "multiple_of": 64}, "norm": "rmsnorm"}, compile_regions=["norm"]
    )
    saved = json.loads(json.dumps(dataclasses.asdict(config)))
    assert saved["blocks"]["mlp"] == {"name": "swiglu", "multiple_of": 64}
    assert FlexBertConfig.from_dict(saved) == config
    model = FlexBertForMaskedLM(FlexBertConfig.from_dict(saved))
    assert model.model.layers[0].mlp.Wo.in_features == 128


def test_a_plugin_marks_its_residual_output_whatever_its_name():
    config = tiny_config(
        hidden_size=256,
        num_attention_heads=4,
        intermediate_size=512,
        num_hidden_layers=8,
        blocks={"mlp": "probe_out_proj"},
    )
    mlp = FlexBertForMaskedLM(config).model.layers[3].mlp
    for weight, sigma in ((mlp.out_proj.weight, 0.02 / math.sqrt(2 * 8)), (mlp.in_proj.weight, 0.02)):
        assert weight.abs().max() <= 2 * sigma + 1e-9  # truncated at ±2σ
        assert weight.std().item() == pytest.approx(0.88 * sigma, rel=0.05)


# --- the contract of every registered block -----------------------------------------------------------


def tiny_model_with(slot: str, name: str) -> FlexBertForMaskedLM:
    return FlexBertForMaskedLM(
        tiny_config(
            hidden_size=32, num_attention_heads=2, intermediate_size=48, num_hidden_layers=2, blocks={slot: name}
        )
    )


@pytest.mark.parametrize("slot", BLOCK_REGISTRIES)
def test_every_registered_block_trains_and_reloads(slot):
    """Every entry registered at the time the test runs, plugins included: a tiny model built with it
    runs forward and backward with finite, non-zero gradients on every parameter, and its state dict
    rebuilds a fresh model computing the same outputs. A new block is tested here by registering it."""
    ids = torch.randint(3, 256, (2, 24))  # longer than the local window of 16
    labels = torch.where(torch.rand(ids.shape) < 0.5, ids, -100)
    entries = BLOCK_REGISTRIES[slot].entries()
    assert entries
    for entry in entries:
        torch.manual_seed(0)
        model = tiny_model_with(slot, entry.name)
        model(ids, labels=labels).loss.backward()
        for name, param in model.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), f"{slot}={entry.name}: {name}"
            assert param.grad.abs().sum() > 0, f"{slot}={entry.name}: no gradient reaches {name}"
        torch.manual_seed(1)
        fresh = tiny_model_with(slot, entry.name)
        fresh.load_state_dict(model.state_dict())
        with torch.no_grad():
            expected = model.eval()(ids).logits
            assert torch.equal(fresh.eval()(ids).logits, expected), f"{slot}={entry.name}"
