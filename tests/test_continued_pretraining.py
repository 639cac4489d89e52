"""Continued pretraining from a published encoder: ``init_from: {hf: SOURCE}`` takes the
architecture, the weights and the tokenizer from a transformers ModernBERT (or Ettin) directory, or
from a checkpoint ``flexbert import-hf`` wrote; and the shipped recipe runs on a small model that
transformers itself saved."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TOKENIZER
from test_convert_to_mds import read_back
from test_recipes_end_to_end import HF5, hf_logits
from test_vocabulary_extension import domain_texts, write_jsonl
from train_helpers import environment, tiny_recipe, write_corpus
from transformers import BertConfig, BertForMaskedLM, ModernBertConfig, ModernBertForMaskedLM

from flexbert.cli import main as cli_main
from flexbert.core.hf import TOKENIZER_FILES, export_hf, import_hf
from flexbert.core.model import FlexBertForMaskedLM
from flexbert.core.tokenizer import load_tokenizer
from flexbert.train.init_from import initialise_weights
from flexbert.train.loggers import read_metrics
from flexbert.train.pretrain import TrainConfig
from flexbert.typed_config import ConfigError
from tokenizers import Tokenizer

pytestmark = pytest.mark.xdist_group("streaming")  # trains, and builds streaming datasets

MODERNBERT_IDS = dict(
    pad_token_id=50283, cls_token_id=50281, sep_token_id=50282, bos_token_id=50281, eos_token_id=50282
)


def save_source(path: Path, tokenizer: Path | None = TOKENIZER, seed: int = 0, **fields) -> Path:
    """A small random ModernBertForMaskedLM as transformers saves it, with ``tokenizer``'s files."""
    values = dict(
        vocab_size=50368,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=48,
        local_attention=16,
        max_position_embeddings=1024,
        **MODERNBERT_IDS,
    )
    values.update(fields)
    torch.manual_seed(seed)
    model = ModernBertForMaskedLM(ModernBertConfig(**values))
    with torch.no_grad():  # transformers starts the decoder bias at zero; a trained one is not
        model.decoder.bias.normal_()
    model.save_pretrained(path)
    for name in TOKENIZER_FILES if tokenizer is not None else ():
        if (tokenizer / name).is_file():
            shutil.copyfile(tokenizer / name, path / name)
    return path


def train_small_tokenizer(out: Path, lines: list[str], vocab_size: int, capfd) -> Path:
    """A tokenizer of flexbert's own (special tokens at ids other than ModernBERT's) trained on ``lines``."""
    text = out.with_suffix(".txt")
    text.write_text("\n".join(lines))
    argv = ["prepare", "tokenizer", "--input", str(text), "--output", str(out), "--vocab-size", str(vocab_size)]
    assert cli_main([*argv, "--no-progress"]) == 0
    capfd.readouterr()
    return out


def continued_recipe(corpus: Path, run_root: Path, source: Path, model: dict | None = None) -> dict:
    """The tiny training recipe with no tokenizer and only ``model``'s keys: the architecture and
    the tokenizer come from ``source``."""
    recipe = tiny_recipe(corpus, run_root)
    recipe["model"] = model or {}
    del recipe["train_loader"]["tokenizer"]
    recipe["init_from"] = {"hf": str(source)}
    return recipe


def source_logits(source: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ModernBertForMaskedLM.from_pretrained(source).eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_source(tmp_path_factory.mktemp("models") / "modernbert-tiny")


def test_a_recipe_without_architecture_keys_takes_the_sources(source, corpus, tmp_path):
    config = TrainConfig.from_dict(continued_recipe(corpus, tmp_path, source, {"attn_backend": "sdpa"}))
    hf = ModernBertConfig.from_pretrained(source)
    ours = config.model_config
    assert (ours.hidden_size, ours.num_hidden_layers, ours.intermediate_size, ours.local_attention) == (32, 4, 48, 16)
    assert (ours.vocab_size, ours.pad_token_id, ours.cls_token_id) == (hf.vocab_size, 50283, 50281)
    assert ours.attn_backend == "sdpa"  # a training-only key the recipe may set
    assert config.train_loader.tokenizer == str(source)  # the loader reads with the source's tokenizer
    assert load_tokenizer(config.train_loader.tokenizer).vocab_size == load_tokenizer(TOKENIZER).vocab_size

    model = FlexBertForMaskedLM(config.model_config)
    initialise_weights(model, config.init_from, config.tokenizer)
    ids = torch.randint(5, 50000, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits = model.eval()(ids).logits
    assert (ours_logits - source_logits(source, ids)).abs().max() <= 1e-5


ETTIN_LIKE = {  # the shapes of Ettin's encoder family, shrunk; each a pattern ModernBERT-base lacks
    "ettin-17m: 7 layers, global every 3 (G L L G L L G)": dict(num_hidden_layers=7, num_attention_heads=4),
    "ettin-150m: one RoPE theta for every layer": dict(global_rope_theta=160_000.0, local_rope_theta=160_000.0),
    "global every 2, window 32": dict(global_attn_every_n_layers=2, local_attention=32),
    "every layer global": dict(num_hidden_layers=3, global_attn_every_n_layers=1),
}


@pytest.mark.parametrize("fields", ETTIN_LIKE.values(), ids=ETTIN_LIKE.keys())
def test_ettin_shaped_configs_continue_with_transformers_logits(fields, corpus, tmp_path):
    source = save_source(tmp_path / "source", **fields)
    config = TrainConfig.from_dict(continued_recipe(corpus, tmp_path, source))
    hf = ModernBertConfig.from_pretrained(source)
    globals_ = [i for i in range(hf.num_hidden_layers) if config.model_config.is_global_layer(i)]
    assert globals_ == list(range(0, hf.num_hidden_layers, hf.global_attn_every_n_layers))
    model = FlexBertForMaskedLM(config.model_config)
    initialise_weights(model, config.init_from, config.tokenizer)
    ids = torch.randint(5, 50000, (2, 90), generator=torch.Generator().manual_seed(2))  # past every window
    with torch.no_grad():
        assert (model.eval()(ids).logits - source_logits(source, ids)).abs().max() <= 1e-5


def test_special_token_ids_other_than_modernberts(corpus, tmp_path, capfd):
    """A source whose tokenizer puts its special tokens elsewhere (as Ettin's and mmBERT's successors'
    do): the ids come from the source and its tokenizer, which agree."""
    tokenizer = train_small_tokenizer(
        tmp_path / "tokenizer", [f"document {i} about encoders and tokens" for i in range(200)], 384, capfd
    )
    trained = load_tokenizer(tokenizer)
    ids = dict(pad_token_id=trained.pad_id, cls_token_id=trained.cls_id, sep_token_id=trained.sep_id)
    assert ids != {key: MODERNBERT_IDS[key] for key in ids}
    source = save_source(
        tmp_path / "source",
        tokenizer,
        vocab_size=trained.vocab_size,
        bos_token_id=trained.cls_id,
        eos_token_id=trained.sep_id,
        **ids,
    )
    config = TrainConfig.from_dict(continued_recipe(corpus, tmp_path, source))
    assert {key: getattr(config.model_config, key) for key in ids} == ids
    assert config.model_config.vocab_size == trained.vocab_size


def test_an_imported_checkpoint_continues_with_its_source_tokenizer(source, corpus, tmp_path):
    checkpoint = import_hf(source, tmp_path / "imported.pt")
    config = TrainConfig.from_dict(continued_recipe(corpus, tmp_path, checkpoint))
    assert config.train_loader.tokenizer == str(source.resolve())
    model = FlexBertForMaskedLM(config.model_config)
    initialise_weights(model, config.init_from, config.tokenizer)
    ids = torch.randint(5, 50000, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model.eval()(ids).logits - source_logits(source, ids)).abs().max() <= 1e-5


def _bert_dir(path: Path) -> Path:
    BertForMaskedLM(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(path)
    return path


def _classifier_dir(path: Path) -> Path:
    from transformers import ModernBertForSequenceClassification

    config = ModernBertConfig(
        vocab_size=50368,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        **MODERNBERT_IDS,
    )
    ModernBertForSequenceClassification(config).save_pretrained(path)
    return path


BAD_SOURCES = {
    "a BERT directory": (_bert_dir, "init_from.hf", "not ModernBERT"),
    "a ModernBERT classifier": (_classifier_dir, "init_from.hf", "not a ModernBertForMaskedLM"),
    "a missing path": (lambda path: path, "init_from.hf", "does not exist"),
}


@pytest.mark.parametrize("make, key, words", BAD_SOURCES.values(), ids=BAD_SOURCES.keys())
def test_a_source_that_is_not_a_modernbert_masked_lm_is_one_line(make, key, words, corpus, tmp_path):
    bad = make(tmp_path / "bad")
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_dict(continued_recipe(corpus, tmp_path / "runs", bad))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(key) and words in message
    assert not (tmp_path / "runs").exists()


def test_an_architecture_key_that_disagrees_names_both_values(source, corpus, tmp_path):
    recipe = continued_recipe(corpus, tmp_path, source)
    recipe["model"] = {"preset": "modernbert-base"}  # hidden_size 768, the source has 32
    with pytest.raises(ConfigError, match=r"^model\.hidden_size: 768 disagrees with the source's 32"):
        TrainConfig.from_dict(recipe)
    recipe["model"] = {"hidden_size": 32, "num_hidden_layers": 4, "mlp_dropout": 0.1}  # restated: fine
    assert TrainConfig.from_dict(recipe).model_config.mlp_dropout == 0.1
    recipe["model"] = {"blocks": {"norm": "rmsnorm"}}
    with pytest.raises(ConfigError, match=r"^model\.blocks\.norm: 'rmsnorm' disagrees with the source's 'layernorm'"):
        TrainConfig.from_dict(recipe)


def test_a_tokenizer_that_disagrees_with_the_source_is_one_line(source, corpus, tmp_path, capfd):
    other = train_small_tokenizer(
        tmp_path / "other-tokenizer", [f"line {i} of some other text" for i in range(100)], 320, capfd
    )
    recipe = continued_recipe(corpus, tmp_path / "runs", source)
    recipe["train_loader"]["tokenizer"] = str(other)
    with pytest.raises(ConfigError) as caught:
        TrainConfig.from_dict(recipe)
    assert str(caught.value).startswith("train_loader.tokenizer") and "\n" not in str(caught.value)
    assert not (tmp_path / "runs").exists()


def test_init_from_takes_hf_or_checkpoint(source, corpus, tmp_path):
    recipe = continued_recipe(corpus, tmp_path, source)
    recipe["init_from"] = {"hf": str(source), "checkpoint": str(source)}
    with pytest.raises(ConfigError, match=r"^init_from: give one of hf .* not both"):
        TrainConfig.from_dict(recipe)
    recipe["init_from"] = {"hf": str(source), "method": "tile"}
    with pytest.raises(ConfigError, match=r"^init_from\.method: applies to checkpoint"):
        TrainConfig.from_dict(recipe)


def test_the_shipped_recipe_continues_a_transformers_model(source, tmp_path, capfd, monkeypatch):
    """yamls/continue-pretraining-base.yaml as it stands, shrunk on the command line: data prepared
    with the source's tokenizer, a warmup from lr 0 (so the first step's export is the source's
    model), held-out evaluation at every save, and exports to transformers."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    texts = tmp_path / "domain-text"
    for split, count in (("train", 120), ("heldout", 20)):
        lines = [
            json.dumps({"text": f"{split} note {i}: " + "the enzyme binds the substrate " * (i % 7 + 1)})
            for i in range(count)
        ]
        (texts / split).mkdir(parents=True)
        (texts / split / "part.jsonl").write_text("\n".join(lines) + "\n")
        assert (
            cli_main(
                [
                    "prepare",
                    "mds",
                    "--input",
                    str(texts / split),
                    "--output",
                    str(tmp_path / "data" / split),
                    "--tokenizer",
                    str(source),
                    "--no-progress",
                    "--workers",
                    "1",
                ]
            )
            == 0
        )
    runs = tmp_path / "runs"
    overrides = [
        f"vars.source={source}",
        f"vars.data={tmp_path / 'data'}",
        f"run_root={runs}",
        "model.attn_backend=sdpa",
        "train_loader.max_seq_len=128",
        "train_loader.num_workers=0",
        "global_batch_rows=2",
        "device_microbatch_rows=1",
        "max_duration=3ba",
        "scheduler.warmup=2ba",
        "scheduler.decay=1ba",
        "save_interval=1ba",
        "eval_interval=1ba",
        "eval_subset_num_batches=2",
        "hf_export.interval=1ba",
        "logging.wandb=null",
    ]
    assert cli_main(["train", "yamls/continue-pretraining-base.yaml", *overrides]) == 0, capfd.readouterr().err[-3000:]
    run = runs / "continue-pretraining-base"
    ids = torch.randint(5, 50000, (2, 60), generator=torch.Generator().manual_seed(4))
    first = run / "hf" / "ba1"
    assert (first / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()  # it ships
    assert (source_logits(first, ids) - source_logits(source, ids)).abs().max() <= 1e-5  # lr 0 at step 1
    assert (source_logits(run / "hf" / "ba3", ids) - source_logits(source, ids)).abs().max() > 1e-4  # it trains
    evaluated = [row["step"] for row in read_metrics(run) if "metrics/eval/LanguageCrossEntropy" in row]
    assert evaluated == [1, 2, 3]
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["model"]["hidden_size"] == 32 and recorded["train_loader"]["tokenizer"] == str(source)


def test_prepare_mds_reads_a_model_directorys_tokenizer(source, tmp_path, capfd):
    """`--tokenizer` takes the source model's own directory, so data and model cannot drift apart."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "doc.txt").write_text("continued pretraining on domain text")
    assert (
        cli_main(
            [
                "prepare",
                "mds",
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(tmp_path / "out"),
                "--tokenizer",
                str(source),
                "--no-progress",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    capfd.readouterr()
    expected = load_tokenizer(TOKENIZER).encode_batch(["continued pretraining on domain text"])[0]
    assert [ids.tolist() for ids in read_back(tmp_path / "out", tmp_path / "cache")] == [expected]


def test_an_extended_tokenizer_grows_the_vocabulary_from_its_pieces(source, corpus, tmp_path, capfd):
    """Old rows bitwise the source's, each new token's rows the mean of its pieces' rows, and the
    larger model exported to transformers 4.x and 5.x with the same logits and tokenizer."""
    text = write_jsonl(tmp_path / "domain.jsonl", domain_texts())
    extended = tmp_path / "extended-tokenizer"
    argv = ["prepare", "tokenizer", "--extend", str(source), "--input", str(text), "--add", "40"]
    assert cli_main([*argv, "--output", str(extended), "--no-progress"]) == 0
    capfd.readouterr()
    recipe = continued_recipe(corpus, tmp_path / "runs", source)
    recipe["train_loader"]["tokenizer"] = str(extended)
    config = TrainConfig.from_dict(recipe)
    old_size, new_size = 50368, config.model_config.vocab_size
    assert new_size == load_tokenizer(extended).vocab_size and new_size > old_size and new_size % 64 == 0

    model = FlexBertForMaskedLM(config.model_config)
    initialise_weights(model, config.init_from, config.tokenizer)
    theirs = ModernBertForMaskedLM.from_pretrained(source).state_dict()
    embeddings, bias = model.model.embeddings.tok_embeddings.weight.detach(), model.decoder.bias.detach()
    assert model.decoder.weight is model.model.embeddings.tok_embeddings.weight  # still tied
    assert torch.equal(embeddings[:old_size], theirs["model.embeddings.tok_embeddings.weight"])
    assert torch.equal(bias[:old_size], theirs["decoder.bias"])
    source_tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    extended_tokenizer = Tokenizer.from_file(str(extended / "tokenizer.json"))
    learnt = [i for i in range(old_size, new_size) if not extended_tokenizer.id_to_token(i).startswith("[unused")]
    assert learnt, "the corpus taught no token"
    for token_id in learnt:
        pieces = source_tokenizer.encode(extended_tokenizer.decode([token_id]), add_special_tokens=False).ids
        mean = theirs["model.embeddings.tok_embeddings.weight"][pieces].mean(dim=0)
        assert torch.allclose(embeddings[token_id], mean, atol=1e-6), extended_tokenizer.id_to_token(token_id)
        assert torch.allclose(bias[token_id], theirs["decoder.bias"][pieces].mean(), atol=1e-6)

    exported = export_hf(model, tmp_path / "hf", tokenizer_dir=extended)
    ids = torch.randint(5, new_size, (2, 50), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model.eval()(ids).logits
    assert (source_logits(exported, ids) - ours).abs().max() <= 1e-5
    inputs = tmp_path / "inputs.pt"
    torch.save({"ids": ids, "mask": torch.ones_like(ids)}, inputs)
    five = hf_logits(exported, inputs, "5.x", env=environment(1, PYTHONPATH=str(HF5)))
    assert five["version"].startswith("5.") and (five["logits"] - ours).abs().max() <= 1e-5
    from transformers import AutoTokenizer

    documents = domain_texts(20, seed=1)
    hf_ids = AutoTokenizer.from_pretrained(exported)(documents, add_special_tokens=False)["input_ids"]
    assert hf_ids == load_tokenizer(exported).encode_batch(documents)
    assert any(i >= old_size for row in hf_ids for i in row)  # the new tokens are used


def test_a_source_saved_by_transformers_5_continues(corpus, tmp_path):
    """transformers 5.x writes the attention pattern as layer_types and rope_parameters only; an
    Ettin-17m-shaped model saved there continues here with 5.x's own logits."""
    source = tmp_path / "saved-by-5"
    script = (
        "import sys, shutil, torch, transformers as t; out, tok = sys.argv[1:]; torch.manual_seed(0); "
        "types = ['full_attention' if i % 3 == 0 else 'sliding_attention' for i in range(7)]; "
        "c = t.ModernBertConfig(vocab_size=50368, hidden_size=32, num_hidden_layers=7, num_attention_heads=4, "
        "intermediate_size=48, local_attention=16, max_position_embeddings=1024, layer_types=types, "
        "rope_parameters={'full_attention': {'rope_type': 'default', 'rope_theta': 160000.0}, "
        "'sliding_attention': {'rope_type': 'default', 'rope_theta': 10000.0}}, "
        "pad_token_id=50283, cls_token_id=50281, sep_token_id=50282, bos_token_id=50281, eos_token_id=50282); "
        "m = t.ModernBertForMaskedLM(c); m.save_pretrained(out); "
        "[shutil.copy(f'{tok}/{n}', out) for n in "
        "('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json')]"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(source), str(TOKENIZER)],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment(1, PYTHONPATH=str(HF5)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((source / "config.json").read_text())
    assert "layer_types" in saved and "global_attn_every_n_layers" not in saved  # 5.x's vocabulary alone
    config = TrainConfig.from_dict(continued_recipe(corpus, tmp_path, source))
    ours = config.model_config
    assert (ours.num_hidden_layers, ours.global_attn_every_n_layers, ours.global_rope_theta) == (7, 3, 160_000.0)
    model = FlexBertForMaskedLM(ours)
    initialise_weights(model, config.init_from, config.tokenizer)
    ids = torch.randint(5, 50000, (2, 70), generator=torch.Generator().manual_seed(6))
    inputs = tmp_path / "inputs.pt"
    torch.save({"ids": ids, "mask": torch.ones_like(ids)}, inputs)
    five = hf_logits(source, inputs, "5.x", env=environment(1, PYTHONPATH=str(HF5)))
    with torch.no_grad():
        assert (model.eval()(ids).logits - five["logits"]).abs().max() <= 1e-5
