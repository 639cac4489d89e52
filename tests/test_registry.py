"""Registries: lookup, clear errors, user blocks from a config import path or an entry point, CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

import flexbert.registry as registry_module
from flexbert.cli import main as cli_main
from flexbert.model import FlexBertForMaskedLM
from flexbert.model.registries import BLOCK_REGISTRIES, MLP, NORM
from flexbert.registry import CATALOGUE, Registry, RegistryError

USER_BLOCK = """
import torch.nn as nn
from flexbert.model.registries import MLP

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
    assert result.stdout.count("\n  - ") == 4  # flash, flash3, flex, sdpa
