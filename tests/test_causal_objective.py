"""The causal objective (``model.objective: clm``), Ettin's decoder on the ModernBERT architecture:
next-token labels from the packed loader, a model that never sees a later token, the demo recipe
trained and exported as transformers' ModernBertDecoderForCausalLM, and the cross-objective
continuation. Logit parity with transformers' decoder, in both lines, is in test_hf_parity.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import ROOT, tiny_config
from train_helpers import write_demo_data

from flexbert.cli import main as cli_main
from flexbert.core.checkpoint import model_from_checkpoint
from flexbert.core.hf import export_hf
from flexbert.core.model import FlexBertForMaskedLM, FlexBertForSequenceClassification
from flexbert.core.tokenizer import load_tokenizer
from flexbert.data.loader import PackedMLMLoader
from flexbert.data.streams import LoaderConfig, StreamConfig
from flexbert.errors import InteropError
from flexbert.train.loggers import read_metrics
from flexbert.train.pretrain import TrainConfig
from flexbert.typed_config import ConfigError
from flexbert.yaml_config import load_yaml_config

IGNORE = -100


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The layout `make demo` writes under vars.data."""
    return write_demo_data(tmp_path_factory.mktemp("ettin") / "data")


def test_the_loader_labels_every_token_with_the_next_one_of_its_piece(data):
    """Inputs are the framed pieces unchanged; labels are the next token within each piece, none at
    its end (so none crosses into the row's next document), computed here from the piece boundaries."""
    tokenizer = load_tokenizer(data / "tokenizer")
    config = LoaderConfig(
        streams={"web": StreamConfig(local=str(data / "mds" / "web"))}, max_seq_len=128, rows_per_batch=4, epochs=1
    )
    loader = PackedMLMLoader(config, tokenizer, objective="clm")
    batches = list(loader)
    assert batches
    for batch in batches:
        ids, labels = batch.input_ids.numpy(), batch.labels.numpy()
        bounds = batch.host_cu_seqlens
        expected = np.full_like(ids, IGNORE)
        for start, end in zip(bounds[:-1], bounds[1:]):
            expected[start : end - 1] = ids[start + 1 : end]
            assert ids[start] == tokenizer.cls_id and ids[end - 1] == tokenizer.sep_id  # nothing masked
        np.testing.assert_array_equal(labels, expected)
        np.testing.assert_array_equal(batch.masked_index.numpy(), np.flatnonzero(expected != IGNORE))
        assert tokenizer.mask_id not in ids


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_a_causal_model_never_sees_a_later_token(backend):
    """Changing the tokens from position 45 of the first packed document on leaves every logit before
    it, and every logit of the other document, unchanged; an encoder's logits before it change."""
    lengths = [70, 30]
    cu_seqlens = torch.tensor([0, 70, 100], dtype=torch.int32)
    ids = torch.randint(5, 256, (100,), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[45:70] = torch.randint(5, 256, (25,), generator=torch.Generator().manual_seed(1))
    for objective in ("clm", "mlm"):
        torch.manual_seed(0)
        config = tiny_config(objective=objective, attn_backend=backend, num_hidden_layers=3, local_attention=16)
        model = FlexBertForMaskedLM(config).eval()
        with torch.no_grad():
            before, after = (
                model(x, cu_seqlens=cu_seqlens, max_seqlen=max(lengths), return_logits=True).logits
                for x in (ids, changed)
            )
        moved = (before - after).abs().amax(dim=-1)
        if objective == "clm":
            assert moved[:45].max() == 0 and moved[70:].max() == 0
            assert moved[45:70].min() > 0
        else:
            assert moved[30:45].max() > 1e-4  # within the window of the changed tokens


def test_export_refuses_what_transformers_decoder_cannot_express(tmp_path):
    """One line each, and no output directory left behind."""
    out = tmp_path / "hf"
    unequal = FlexBertForMaskedLM(tiny_config(objective="clm", global_rope_theta=160_000.0, local_rope_theta=10_000.0))
    with pytest.raises(InteropError, match="local_rope_theta=10000.0 differs from model.global_rope_theta"):
        export_hf(unequal, out)
    classifier = FlexBertForSequenceClassification(tiny_config(objective="clm", local_rope_theta=160_000.0), 2)
    with pytest.raises(InteropError, match="FlexBertForSequenceClassification on a causal model"):
        export_hf(classifier, out)
    assert not out.exists()
    # Only local layers read the local theta: an all-global decoder exports whatever it says.
    all_global = FlexBertForMaskedLM(tiny_config(objective="clm", global_attn_every_n_layers=1))
    assert json.loads((export_hf(all_global, out) / "config.json").read_text())["model_type"] == "modernbert-decoder"


def recipe(data: Path, name: str, *overrides: str) -> list[str]:
    return [f"yamls/demo/{name}.yaml", f"vars.data={data}", *overrides]


def test_a_masking_section_in_a_causal_recipe_is_refused(data):
    raw = load_yaml_config(ROOT / "yamls" / "demo" / "ettin-decoder.yaml", [f"vars.data={data}"])
    TrainConfig.from_dict(raw)  # as shipped
    raw["train_loader"]["masking"] = {"mlm_probability": 0.3}
    with pytest.raises(ConfigError, match=r"train_loader\.masking: model.objective is clm"):
        TrainConfig.from_dict(raw)


@pytest.mark.xdist_group("streaming")  # trains, and builds streaming datasets
def test_the_ettin_demo_recipes_train_a_decoder_export_it_and_continue_it_as_an_encoder(
    data, tmp_path, monkeypatch, capfd
):
    monkeypatch.chdir(ROOT)
    runs = tmp_path / "runs"
    short = [f"run_root={runs}", "max_duration=3ba", "global_batch_rows=4", "device_microbatch_rows=2"]
    short += ["batch_warmup=null", "eval_interval=3ba", "eval_subset_num_batches=1", "logging.progress_bar=false"]
    assert cli_main(["train", *recipe(data, "ettin-decoder", *short)]) == 0
    decoder_run = runs / "demo-ettin-decoder"
    metrics = read_metrics(decoder_run)
    losses = [row["loss/train/total"] for row in metrics if "loss/train/total" in row]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert abs(losses[0] - np.log(4096)) < 1.0  # a fresh model guesses among the whole vocabulary
    assert any("metrics/eval/LanguageCrossEntropy" in row for row in metrics)

    # The decoder in transformers, from the CLI's export: the same logits.
    checkpoint = decoder_run / "checkpoints" / "latest-rank0.pt"
    assert cli_main(["export-hf", str(checkpoint), str(tmp_path / "hf")]) == 0
    assert "local_attention=34" in capfd.readouterr().err  # the note on the window's other reading
    ours, _ = model_from_checkpoint(checkpoint)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == "ModernBertDecoderForCausalLM"
    ids = torch.randint(5, 4096, (2, 100), generator=torch.Generator().manual_seed(0))  # past the window
    mask = torch.ones_like(ids)
    mask[1, 60:] = 0
    with torch.no_grad():
        expected = ours.eval()(ids, mask, return_logits=True).logits
        actual = theirs(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=0)

    # Ettin's cross-objective continuation: an encoder from the decoder's weights (init_from.hf).
    continued = [f"init_from.hf={checkpoint}", *short, "max_duration=1ba", "eval_interval=1000ba"]
    assert cli_main(["train", *recipe(data, "ettin-encoder-from-decoder", *continued)]) == 0
    encoder_run = runs / "demo-ettin-encoder-from-decoder"
    recorded = json.loads((encoder_run / "config.json").read_text())
    assert recorded["model"]["objective"] == "mlm" and recorded["train_loader"]["masking"]["mlm_probability"] == 0.3
    encoder, _ = model_from_checkpoint(encoder_run / "checkpoints" / "latest-rank0.pt")
    assert encoder.config.objective == "mlm" and not encoder.config.causal
    # One step moved the weights from the decoder's, not from a fresh initialisation.
    start, end = ours.state_dict(), encoder.state_dict()
    fresh = FlexBertForMaskedLM(encoder.config).state_dict()
    name = "model.layers.1.mlp.Wi.weight"
    assert (end[name] - start[name]).abs().mean() < (end[name] - fresh[name]).abs().mean() / 10


@pytest.mark.xdist_group("streaming")  # builds streaming datasets before the export callback refuses
def test_a_decoder_recipe_exporting_what_transformers_cannot_express_stops_in_one_line(
    data, tmp_path, capsys, monkeypatch
):
    """hf_export in a recipe whose decoder transformers 4.x would compute differently: one line, and
    no run folder."""
    monkeypatch.chdir(ROOT)
    runs = tmp_path / "runs"
    unequal = ["model.global_rope_theta=160000.0", "hf_export.interval=1ba", f"run_root={runs}"]
    assert cli_main(["train", *recipe(data, "ettin-decoder", *unequal)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "model.local_rope_theta=10000.0 differs from model.global_rope_theta" in err
    assert not runs.exists()
