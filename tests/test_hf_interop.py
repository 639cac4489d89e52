"""Hugging Face interop: export to a ModernBERT directory that transformers loads with our logits,
import into a checkpoint that training loads, and the round trip between them."""

import json
import shutil

import pytest
import torch
from conftest import tiny_config
from train_helpers import TOKENIZER, tiny_recipe, write_corpus, write_recipe

from flexbert.cli import main as cli_main
from flexbert.core.hf import TOKENIZER_FILES, export_hf, export_notes, from_hf, hf_config_from_flexbert
from flexbert.core.model import FlexBertForMaskedLM

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytestmark = pytest.mark.xdist_group("streaming")  # the import test builds a training loader

THETAS = {"phase1": (10_000.0, 10_000.0), "phase2": (160_000.0, 10_000.0)}  # (global, local)
# The tokenizer's special-token ids, for models that ship with it.
TOKENIZER_IDS = dict(vocab_size=50368, pad_token_id=50283, cls_token_id=50281, sep_token_id=50282)


def sharpened_model(**overrides) -> FlexBertForMaskedLM:
    """At the init scale attention is nearly uniform and every activation sees inputs near 0, where
    gelu, silu and tanh-gelu barely differ; a wrong theta, window or activation would hide below the
    tolerance. Scaling every projection up makes each of them show (as test_hf_parity does for Wqkv)."""
    model = FlexBertForMaskedLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("Wqkv.weight", "Wi.weight", "Wo.weight", "dense.weight")):
                param.mul_(8.0)
    return model


def padded_batch(vocab_size: int, window: int):
    """Rows longer than the local window, with several padding lengths."""
    seqlen = 2 * window + 40
    input_ids = torch.randint(3, vocab_size, (4, seqlen))
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate([seqlen, seqlen - 7, window + 3, 5]):
        attention_mask[row, :length] = 1
    return input_ids, attention_mask


def max_logit_gap(ours: FlexBertForMaskedLM, hf_dir) -> float:
    hf_model, info = transformers.AutoModelForMaskedLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    input_ids, attention_mask = padded_batch(ours.config.vocab_size, ours.config.local_attention)
    with torch.no_grad():
        expected = ours(input_ids, attention_mask).logits
        actual = hf_model.eval()(input_ids=input_ids, attention_mask=attention_mask).logits
    real = attention_mask.bool()
    return (actual[real] - expected[real]).abs().max().item()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli_main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(result, fragment: str) -> None:
    code, _, err = result
    assert code == 2, err
    assert err.startswith("flexbert: error: ") and err.strip().count("\n") == 0, err
    assert fragment in err, err


# --- export -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("phase", THETAS)
def test_export_loads_in_transformers_with_our_logits(phase, tmp_path):
    global_theta, local_theta = THETAS[phase]
    ours = sharpened_model(local_attention=16, global_rope_theta=global_theta, local_rope_theta=local_theta)
    export_hf(ours, tmp_path / "hf")

    assert max_logit_gap(ours, tmp_path / "hf") <= 1e-4
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["ModernBertForMaskedLM"] and config["model_type"] == "modernbert"
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert (config["hidden_activation"], config["classifier_activation"]) == ("gelu", "gelu")
    # transformers 4.x names ...
    assert (config["global_rope_theta"], config["local_rope_theta"]) == (global_theta, local_theta)
    assert (config["global_attn_every_n_layers"], config["local_attention"]) == (3, 16)
    # ... and the 5.x names, saying the same.
    assert config["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    assert config["rope_parameters"] == {
        "full_attention": {"rope_type": "default", "rope_theta": global_theta},
        "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
    }
    # The weights file holds exactly transformers' keys, the tied decoder matrix left out as save_pretrained does.
    saved = safetensors_torch.load_file(tmp_path / "hf" / "model.safetensors")
    expected_keys = set(transformers.ModernBertForMaskedLM(hf_config_from_flexbert(ours.config)).state_dict())
    assert set(saved) == expected_keys - {"decoder.weight"}


@pytest.fixture(scope="module")
def phase2_export(tmp_path_factory):
    ours = sharpened_model(local_attention=16, global_rope_theta=160_000.0, local_rope_theta=10_000.0)
    return ours, export_hf(ours, tmp_path_factory.mktemp("phase2") / "hf")


@pytest.mark.parametrize(
    "field,wrong",
    [
        ("global_rope_theta", 10_000.0),
        ("local_rope_theta", 160_000.0),
        ("local_attention", 32),
        ("hidden_activation", "silu"),
        ("classifier_activation", "silu"),
    ],
)
def test_a_wrong_value_in_config_json_breaks_parity(phase2_export, field, wrong, tmp_path):
    """Each of these loads without complaint in transformers; only the logits tell."""
    ours, exported = phase2_export
    edited = shutil.copytree(exported, tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    config[field] = wrong
    (edited / "config.json").write_text(json.dumps(config))
    assert max_logit_gap(ours, edited) > 1e-3


def test_biases_transformers_supports_are_exported(tmp_path):
    """ModernBERT has no biases but transformers' implementation takes every one of them as an option."""
    ours = sharpened_model(attention_bias=True, mlp_bias=True, head_bias=True, norm_bias=True, decoder_bias=False)
    with torch.no_grad():  # biases start at 0, where a dropped one would go unnoticed
        for name, param in ours.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.5)
    export_hf(ours, tmp_path / "hf")
    assert max_logit_gap(ours, tmp_path / "hf") <= 1e-4


def test_fill_mask_pipeline_runs_on_the_export(tmp_path):
    ours = FlexBertForMaskedLM(tiny_config(**TOKENIZER_IDS)).eval()
    out = export_hf(ours, tmp_path / "hf", tokenizer_dir=TOKENIZER)
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (TOKENIZER / name).read_bytes()

    fill = transformers.pipeline("fill-mask", model=str(out), top_k=3)
    predictions = fill("The capital of France is [MASK].")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    encoded = tokenizer("The capital of France is [MASK].", return_tensors="pt")
    masked = encoded["input_ids"][0].tolist().index(tokenizer.mask_token_id)
    with torch.no_grad():
        logits = ours(encoded["input_ids"], encoded["attention_mask"]).logits[0, masked]
    assert [p["token"] for p in predictions] == logits.topk(3).indices.tolist()
    assert all("[MASK]" not in p["sequence"] for p in predictions)


def test_export_refuses_a_tokenizer_that_does_not_fit(tmp_path):
    with pytest.raises(ValueError, match="model.pad_token_id=0 disagrees with tokenizer"):
        wrong_pad = tiny_config(**{**TOKENIZER_IDS, "pad_token_id": 0})
        export_hf(FlexBertForMaskedLM(wrong_pad), tmp_path / "hf", TOKENIZER)
    with pytest.raises(ValueError, match="more than the model's vocab_size=256"):
        export_hf(FlexBertForMaskedLM(tiny_config()), tmp_path / "hf", TOKENIZER)
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize(
    "overrides,feature",
    [
        ({"blocks": {"norm": "rmsnorm"}}, "model.blocks.norm"),
        ({"blocks": {"layer": "postnorm"}}, "model.blocks.layer"),
        ({"blocks": {"embeddings": "learned_absolute", "attention": "plain"}}, "model.blocks.embeddings"),
        ({"blocks": {"attention": "plain"}}, "model.blocks.attention"),
        ({"blocks": {"mlp": "mlp"}}, "model.blocks.mlp"),
        ({"final_norm": False}, "model.final_norm"),
    ],
)
def test_unrepresentable_architectures_are_refused_before_writing(overrides, feature, tmp_path):
    with pytest.raises(ValueError, match=feature):
        export_hf(FlexBertForMaskedLM(tiny_config(**overrides)), tmp_path / "hf")
    assert not list(tmp_path.iterdir())


def test_training_only_differences_export_and_the_export_says_what_it_mapped(tmp_path):
    """ModernBERT's recipes drop attention output (0.1) but not probabilities (0.0); transformers has
    one attention_dropout. Dropout acts only in training, so the model exports with equal logits."""
    ours = sharpened_model(local_attention=16, attention_probs_dropout=0.0, attention_output_dropout=0.1)
    export_hf(ours, tmp_path / "hf")
    assert max_logit_gap(ours, tmp_path / "hf") <= 1e-4
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["attention_dropout"] == 0.0
    (note,) = export_notes(ours.config)
    assert "attention_dropout=0.0 (model.attention_probs_dropout)" in note
    assert "model.attention_output_dropout=0.1 is left out" in note
    assert export_notes(tiny_config()) == []


# --- a training checkpoint, through the command line -------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A two-batch run: its recipe and its checkpoint inside the run folder."""
    from flexbert.train.pretrain import TrainConfig, build_trainer

    recipe = tiny_recipe(
        corpus,
        tmp_path_factory.mktemp("runs"),
        max_duration="2ba",
        save_interval="2ba",
        **{"model.global_rope_theta": 160_000.0},
    )
    config = TrainConfig.from_dict(recipe)
    trainer = build_trainer(config, recipe)
    trainer.fit()
    trainer.close()
    return recipe, trainer.state.model.model, config.run_dir.checkpoints / "latest-rank0.pt"


def test_export_hf_reads_the_run_folder_config(trained, tmp_path, capsys):
    _, model, checkpoint = trained
    code, out, err = run_cli(capsys, "export-hf", checkpoint, tmp_path / "hf")
    assert code == 0 and out.strip() == str(tmp_path / "hf"), err
    hf_model, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    hf_state = hf_model.state_dict()
    assert all(torch.equal(tensor, hf_state[name]) for name, tensor in model.state_dict().items())
    config = hf_model.config
    assert (config.global_rope_theta, config.local_rope_theta, config.local_attention) == (160_000.0, 10_000.0, 16)
    assert (config.pad_token_id, config.vocab_size) == (50283, 50368)
    for name in TOKENIZER_FILES:  # the training tokenizer, by default
        assert (tmp_path / "hf" / name).read_bytes() == (TOKENIZER / name).read_bytes()


def test_export_hf_outside_the_run_folder_needs_the_recipe(trained, tmp_path, capsys):
    recipe, model, checkpoint = trained
    moved = shutil.copy(checkpoint, tmp_path / "moved.pt")
    assert_one_line_error(run_cli(capsys, "export-hf", moved, tmp_path / "hf"), "pass the recipe with --config")
    assert not (tmp_path / "hf").exists()

    recipe_file = write_recipe(tmp_path / "recipe.yaml", recipe)
    code, _, err = run_cli(capsys, "export-hf", moved, tmp_path / "hf", "--config", recipe_file)
    assert code == 0, err
    saved = safetensors_torch.load_file(tmp_path / "hf" / "model.safetensors")
    assert torch.equal(saved["model.final_norm.weight"], model.model.final_norm.weight)


# --- import, and back ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A ModernBertForMaskedLM made by transformers alone, saved, then imported with the CLI."""
    root = tmp_path_factory.mktemp("import")
    hf_config = transformers.ModernBertConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        local_attention=16,
        global_rope_theta=10_000.0,
        local_rope_theta=10_000.0,
        bos_token_id=50281,
        eos_token_id=50282,
        **TOKENIZER_IDS,
    )
    torch.manual_seed(1)
    transformers.ModernBertForMaskedLM(hf_config).save_pretrained(root / "hf")
    assert cli_main(["import-hf", str(root / "hf"), str(root / "imported.pt")]) == 0
    return root / "hf", root / "imported.pt"


def test_training_loads_the_imported_weights(imported, corpus, tmp_path):
    from flexbert.train.pretrain import TrainConfig, build_trainer

    hf_dir, checkpoint = imported
    recipe = tiny_recipe(corpus, tmp_path, load_path=str(checkpoint), load_weights_only=True)
    trainer = build_trainer(TrainConfig.from_dict(recipe), recipe)
    hf_state = transformers.ModernBertForMaskedLM.from_pretrained(hf_dir).state_dict()
    trained_state = trainer.state.model.model.state_dict()
    assert trained_state.keys() == hf_state.keys()
    assert all(torch.equal(tensor, hf_state[name]) for name, tensor in trained_state.items())
    trainer.close()


def test_import_then_export_is_bit_identical(imported, tmp_path, capsys):
    hf_dir, checkpoint = imported
    code, _, err = run_cli(capsys, "export-hf", checkpoint, tmp_path / "hf")
    assert code == 0 and "no tokenizer is known" in err, err
    original = safetensors_torch.load_file(hf_dir / "model.safetensors")
    exported = safetensors_torch.load_file(tmp_path / "hf" / "model.safetensors")
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[name], exported[name]) for name in original)
    original_config = json.loads((hf_dir / "config.json").read_text())
    exported_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    original_config.pop("transformers_version")
    assert {key: exported_config[key] for key in original_config} == original_config


# --- bad input: one line, nothing written --------------------------------------------------------------


def test_bad_input_gives_one_clear_error(imported, tmp_path, capsys):
    hf_dir, checkpoint = imported
    out = tmp_path / "out.pt"
    assert_one_line_error(run_cli(capsys, "import-hf", tmp_path / "nowhere", out), "no config.json")
    bert = tmp_path / "bert"
    transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(bert)
    assert_one_line_error(run_cli(capsys, "import-hf", bert, out), "holds a 'bert' model, not ModernBERT")
    encoder_only = tmp_path / "encoder"
    encoder = transformers.ModernBertModel(transformers.ModernBertConfig.from_pretrained(hf_dir))
    encoder.save_pretrained(encoder_only)
    assert_one_line_error(run_cli(capsys, "import-hf", encoder_only, out), "lacks decoder.bias, head.dense.weight")
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob(".*"))

    assert_one_line_error(
        run_cli(capsys, "export-hf", tmp_path / "missing.pt", tmp_path / "hf"), "checkpoint not found"
    )
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(
        run_cli(capsys, "export-hf", tmp_path / "junk.pt", tmp_path / "hf"), "is not a readable Composer checkpoint"
    )
    assert not (tmp_path / "hf").exists()


def test_existing_output_needs_overwrite(imported, tmp_path, capsys):
    hf_dir, checkpoint = imported
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    assert_one_line_error(run_cli(capsys, "export-hf", checkpoint, tmp_path / "hf"), "use --overwrite")
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]
    assert run_cli(capsys, "export-hf", checkpoint, tmp_path / "hf", "--overwrite")[0] == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]

    (tmp_path / "old.pt").write_text("mine")
    assert_one_line_error(run_cli(capsys, "import-hf", hf_dir, tmp_path / "old.pt"), "use --overwrite")
    assert (tmp_path / "old.pt").read_text() == "mine"
    assert run_cli(capsys, "import-hf", hf_dir, tmp_path / "old.pt", "--overwrite")[0] == 0
    assert torch.equal(
        torch.load(tmp_path / "old.pt", weights_only=False)["state"]["model"]["model.decoder.bias"],
        from_hf(hf_dir).decoder.bias,
    )


# --- classification exports -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "task,pooling,num_labels", [("sequence", "cls", 3), ("sequence", "mean", 1), ("token", None, 5)]
)
def test_classifiers_export_to_their_transformers_class(tmp_path, task, pooling, num_labels):
    import transformers
    from conftest import tiny_config

    from flexbert.core.hf import export_hf
    from flexbert.core.model import FlexBertForSequenceClassification, FlexBertForTokenClassification

    config = tiny_config(local_attention=16)
    if task == "sequence":
        ours = FlexBertForSequenceClassification(config, num_labels, pooling=pooling).eval()
        auto = transformers.AutoModelForSequenceClassification
    else:
        ours = FlexBertForTokenClassification(config, num_labels).eval()
        auto = transformers.AutoModelForTokenClassification
    with torch.no_grad():  # a trained-looking classifier, so differences would show
        ours.classifier.bias.normal_()
        for layer in ours.model.layers:
            layer.attn.Wqkv.weight.mul_(8.0)
    export_hf(ours, tmp_path / "hf")
    theirs, info = auto.from_pretrained(tmp_path / "hf", output_loading_info=True, attn_implementation="eager")
    assert not any(info.values())
    assert type(theirs).__name__ == f"ModernBertFor{'Sequence' if task == 'sequence' else 'Token'}Classification"
    theirs.eval()
    ids = torch.randint(3, 256, (3, 60))
    mask = torch.ones_like(ids)
    mask[1, 45:] = 0
    mask[2, 20:] = 0
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        actual = ours(ids, mask).logits
    if task == "token":
        expected, actual = expected[mask.bool()], actual[mask.bool()]
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= 1e-4
