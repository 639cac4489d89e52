"""export-st: an embedding model written as a sentence-transformers directory, loaded by
sentence-transformers itself, embeds as flexbert does."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import TOKENIZER, tiny_config

from flexbert.cli import main as cli_main
from flexbert.core.checkpoint import MODEL_CONFIG_KEY, write_weights
from flexbert.core.embedders import POOLINGS, load_embedder
from flexbert.core.hf import export_hf
from flexbert.core.model import FlexBertForMaskedLM, FlexBertForSentenceEmbedding
from flexbert.core.model.classification import Pooling
from flexbert.core.tokenizer import load_tokenizer
from flexbert.data.labeled import fit

sentence_transformers = pytest.importorskip("sentence_transformers")

MAX_SEQ_LEN = 96
# sentence-transformers strips each text before tokenizing it (flexbert does not), so none of these
# begins or ends with white space.
TEXTS = [
    "Hi.",
    "A sentence of middling length about dense retrieval with encoders.",
    ("Long documents pad short ones in a batch. " * 8).strip(),  # past the local window of 16 tokens
    ("This one is cut: it runs past the fine-tune's max_seq_len, and must be cut the same way. " * 12).strip(),
]


def tokenizer_ids() -> dict:
    tokenizer = load_tokenizer(TOKENIZER)
    return dict(pad_token_id=tokenizer.pad_id, cls_token_id=tokenizer.cls_id, sep_token_id=tokenizer.sep_id)


MODEL_SECTION = dict(
    vocab_size=50368,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=48,
    max_position_embeddings=512,
    local_attention=16,
    attn_backend="sdpa",
)


def sharpen(model: torch.nn.Module) -> None:
    """At the init scale attention is nearly uniform and every token's state alike, so cls and mean
    pooling, a lost window or a shifted position would hide below the tolerance; larger projections
    make each of them show (as test_hf_interop does)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("Wqkv.weight", "Wi.weight", "Wo.weight")):
                param.mul_(8.0)


def finetune_run(root, pooling: Pooling) -> tuple:
    """A fine-tune's run folder as training leaves it: config.json (the recipe) and best.pt."""
    model = FlexBertForSentenceEmbedding(tiny_config(**MODEL_SECTION, **tokenizer_ids()), pooling=pooling)
    sharpen(model)
    recipe = {
        "run_name": "embed",
        "tokenizer": str(TOKENIZER),
        "model": MODEL_SECTION,
        "max_seq_len": MAX_SEQ_LEN,
        "max_duration": "1ep",
        "task": {"kind": "embedding", "metrics": ["recall_at_1"], "pooling": pooling},
    }
    (root / "embed").mkdir(parents=True)
    (root / "embed" / "config.json").write_text(json.dumps(recipe))
    checkpoint = root / "embed" / "checkpoints" / "best.pt"
    write_weights(checkpoint, model.state_dict())
    return checkpoint, model.eval()


def flexbert_vectors(model: FlexBertForSentenceEmbedding, texts: list[str], max_seq_len: int) -> np.ndarray:
    """One document at a time, as the fine-tune framed them: [CLS] text [SEP], cut keeping [SEP]."""
    tokenizer = load_tokenizer(TOKENIZER).tokenizer
    vectors = []
    with torch.no_grad():
        for text in texts:
            ids = torch.from_numpy(fit(np.asarray(tokenizer.encode(text).ids), max_seq_len))
            vectors.append(model.embed(ids[None]))
    return torch.cat(vectors).numpy()


def st_vectors(out_dir, texts: list[str]) -> np.ndarray:
    model = sentence_transformers.SentenceTransformer(str(out_dir), device="cpu")
    return model.encode(texts, batch_size=len(texts), convert_to_numpy=True)  # one padded batch


def test_pooling_choices_are_the_models():
    assert POOLINGS == Pooling.__args__


@pytest.mark.parametrize("pooling", POOLINGS)
def test_finetuned_embedding_model_loads_in_sentence_transformers_with_our_vectors(tmp_path, pooling):
    checkpoint, model = finetune_run(tmp_path / "runs", pooling)
    out = tmp_path / "st"
    assert cli_main(["export-st", str(checkpoint), str(out)]) == 0

    expected = flexbert_vectors(model, TEXTS, MAX_SEQ_LEN)
    actual = st_vectors(out, TEXTS)
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
    model.pooling = "cls" if pooling == "mean" else "mean"  # the other pooling would have been caught
    assert np.abs(flexbert_vectors(model, TEXTS, MAX_SEQ_LEN) - actual).max() > 1e-2
    assert len(load_tokenizer(TOKENIZER).tokenizer.encode(TEXTS[-1]).ids) > MAX_SEQ_LEN  # the cut was tested

    # The layout is the one sentence-transformers' own save() writes for this model.
    saved = tmp_path / "saved-by-st"
    sentence_transformers.SentenceTransformer(str(out), device="cpu").save(str(saved))
    for name in ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json"):
        assert json.loads((out / name).read_text()) == json.loads((saved / name).read_text()), name
    ours, theirs = (json.loads((d / "config_sentence_transformers.json").read_text()) for d in (out, saved))
    assert {**ours, "__version__": None} == {**theirs, "__version__": None}
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == MAX_SEQ_LEN


def test_bare_encoder_weights_load_into_transformers_modernbert_model(tmp_path):
    checkpoint, _ = finetune_run(tmp_path / "runs", "mean")
    out = tmp_path / "st"
    assert cli_main(["export-st", str(checkpoint), str(out)]) == 0
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "ModernBertModel"
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights


def mlm_sources(root) -> tuple[FlexBertForMaskedLM, dict]:
    """One pretrained encoder as each source without a trained pooling: a checkpoint carrying its
    model config (as import-hf and average write them) and a Hugging Face directory."""
    mlm = FlexBertForMaskedLM(tiny_config(**MODEL_SECTION, **tokenizer_ids())).eval()
    sharpen(mlm)
    checkpoint = root / "pretrained.pt"
    write_weights(checkpoint, mlm.state_dict(), **{MODEL_CONFIG_KEY: dataclasses.asdict(mlm.config)})
    hf_dir = export_hf(mlm, root / "hf", TOKENIZER)
    return mlm, {"checkpoint": checkpoint, "hf": hf_dir}


def pooled(mlm: FlexBertForMaskedLM, texts: list[str], pooling: Pooling, max_seq_len: int) -> np.ndarray:
    """The encoder's token states pooled by hand: the [CLS] state or the mean, not normalised."""
    tokenizer = load_tokenizer(TOKENIZER).tokenizer
    vectors = []
    with torch.no_grad():
        for text in texts:
            ids = torch.from_numpy(fit(np.asarray(tokenizer.encode(text).ids), max_seq_len))
            hidden = mlm.model.encode(ids[None]).hidden  # [T, H]
            vectors.append(hidden[0] if pooling == "cls" else hidden.mean(0))
    return torch.stack(vectors).numpy()


@pytest.mark.parametrize("source", ["checkpoint", "hf"])
def test_pretrained_encoder_exports_with_the_pooling_asked_for(tmp_path, source):
    mlm, sources = mlm_sources(tmp_path)
    out = tmp_path / "st"
    argv = ["export-st", str(sources[source]), str(out), "--pooling", "cls", "--max-seq-length", "64"]
    assert cli_main([*argv, "--tokenizer", str(TOKENIZER), "--no-normalize"]) == 0

    expected = pooled(mlm, TEXTS, "cls", 64)
    actual = st_vectors(out, TEXTS)
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
    assert not np.allclose(np.linalg.norm(actual, axis=1), 1.0)  # no Normalize module
    assert [module["path"] for module in json.loads((out / "modules.json").read_text())] == ["", "1_Pooling"]


def test_load_embedder_reads_a_finetune_run(tmp_path):
    checkpoint, model = finetune_run(tmp_path / "runs", "cls")
    embedder = load_embedder(checkpoint)
    assert (embedder.pooling, embedder.max_seq_len, embedder.tokenizer_dir) == ("cls", MAX_SEQ_LEN, TOKENIZER)
    assert not embedder.model.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(embedder.model.state_dict()[name], tensor), name


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli_main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def test_bad_input_gives_one_clear_error(tmp_path, capsys):
    checkpoint, _ = finetune_run(tmp_path / "runs", "mean")
    _, sources = mlm_sources(tmp_path)
    out = tmp_path / "st"
    bare = tmp_path / "bare.pt"  # weights alone: no model config, no run folder
    write_weights(bare, FlexBertForMaskedLM(tiny_config()).state_dict())
    cases = [
        ([tmp_path / "missing.pt", out], "missing.pt does not exist"),
        ([sources["checkpoint"], out], "choose one with --pooling cls|mean"),
        ([checkpoint, out, "--pooling", "cls"], "fine-tuned with mean pooling; --pooling cls"),
        ([checkpoint, out, "--max-seq-length", "1000"], "--max-seq-length=1000"),
        ([sources["checkpoint"], out, "--pooling", "mean"], "add --tokenizer DIR"),
        ([bare, out, "--pooling", "mean"], "cannot tell which model"),
        ([tmp_path / "hf" / "config.json", out, "--pooling", "mean"], "config.json"),
    ]
    for argv, message in cases:
        code, err = run_cli(capsys, "export-st", *argv)
        assert code == 2, (argv, err)
        assert err.startswith("flexbert: error: ") and err.count("\n") == 1, err
        assert message in err, (message, err)
        assert not out.exists()
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no staging left

    assert run_cli(capsys, "export-st", checkpoint, out)[0] == 0
    code, err = run_cli(capsys, "export-st", checkpoint, out)
    assert code == 2 and "use --overwrite" in err and err.count("\n") == 1
    assert run_cli(capsys, "export-st", checkpoint, out, "--overwrite")[0] == 0
