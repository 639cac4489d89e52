"""The bad-input catalogue: each way a user can hand flexbert something wrong, the one error they then
see, and that nothing half-written is left behind. docs/bad-inputs.md lists the same
cases; keep the two in step."""

import errno
import os
import pickle
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from data_helpers import write_stream
from streaming import MDSWriter
from test_callbacks_loggers import LOGGING_CONFIG_ERRORS
from test_convert_to_mds import write_jsonl
from test_remote_streaming import command_line as convert_command_line
from train_helpers import TOKENIZER, tiny_recipe, write_corpus, write_recipe

from flexbert.cli import main as cli_main
from flexbert.core.model import FlexBertForMaskedLM
from flexbert.core.model.blocks import build_norm
from flexbert.core.model.registries import LAYER
from flexbert.core.tokenizer import load_tokenizer
from flexbert.data.convert import convert_to_mds
from flexbert.data.loader import DataError, PackedMLMLoader
from flexbert.data.streams import DocumentDataset, LoaderConfig
from flexbert.train.pretrain import TrainConfig
from flexbert.typed_config import ConfigError, from_dict

pytestmark = [
    pytest.mark.xdist_group("streaming")  # loaders and conversions build streaming datasets
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), {"web": [40] * 30, "code": [40] * 30})


def one_line_error(status: int, capsys) -> str:
    """The command's only stderr line, after checking that it failed with status 2 (no traceback)."""
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert err.count("\n") == 0, err
    return err


def train_error(recipe: dict, tmp_path: Path, capsys, *overrides: str) -> str:
    """What ``flexbert train`` prints for ``recipe``; its run folder must not have been started."""
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    error = one_line_error(cli_main(["train", str(path), *overrides]), capsys)
    assert not (Path(recipe["run_root"]) / recipe["run_name"]).exists()
    return error


def convert_error(tmp_path: Path, capsys, *inputs: Path, **options: str) -> str:
    """What `flexbert prepare mds` (data_prep/convert_to_mds.py) prints for ``inputs``; no output folder may appear."""
    out = tmp_path / "out"
    argv = [
        "--input",
        *map(str, inputs),
        "--output",
        str(out),
        "--tokenizer",
        str(TOKENIZER),
        "--workers",
        "1",
        "--no-progress",
    ]
    for option, value in options.items():
        argv += [f"--{option.replace('_', '-')}", value]
    error = one_line_error(convert_command_line()(argv), capsys)
    assert not out.exists()
    return error


def loader_config(streams: dict, **overrides) -> LoaderConfig:
    values = dict(
        tokenizer=str(TOKENIZER),
        max_seq_len=64,
        rows_per_batch=2,
        sample_batch_size=4,
        epochs=1,
        streams=streams,
        **overrides,
    )
    return from_dict(LoaderConfig, values, "train_loader")


def streams_at(*folders: Path) -> dict:
    return {folder.name: {"local": str(folder)} for folder in folders}


def leftovers(folder: Path) -> list[str]:
    """Temporary, staging or partial files under ``folder``."""
    return sorted(
        str(path) for path in folder.rglob("*") if path.name.startswith(".") or path.suffix in (".tmp", ".partial")
    )


# --- recipes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, where, problem",
    [
        (
            "run_name: tiny\nmodel:\n  preset: [modernbert-base\nrun_root: runs\n",
            "line 4, column 9",
            "is not valid YAML: did not find expected ',' or ']' (while parsing a flow sequence that starts at line 3)",
        ),
        (
            "run_name: tiny\n\tmodel: {}\n",
            "line 2, column 1",
            "is not valid YAML: found a tab character that violates indentation",
        ),
    ],
)
def test_broken_yaml_names_the_file_and_line(tmp_path, capsys, text, where, problem):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    error = one_line_error(cli_main(["train", str(path)]), capsys)
    assert error.startswith(f"flexbert: error: {path}, {where}: {problem}")


@pytest.mark.parametrize("values, key_path, message", LOGGING_CONFIG_ERRORS)
def test_a_bad_logging_section_stops_flexbert_train(corpus, tmp_path, capsys, values, key_path, message):
    recipe = tiny_recipe(corpus, tmp_path / "runs", logging={"progress_bar": False, **values})
    error = train_error(recipe, tmp_path, capsys)
    assert error.startswith(f"flexbert: error: {key_path}: ") and message in error, error


def test_a_recipe_that_is_not_a_mapping(tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text("- run_name: tiny\n- model: {}\n")
    assert one_line_error(cli_main(["train", str(path)]), capsys) == (
        f"flexbert: error: {path}: must hold a mapping of config keys (key: value lines), not a list"
    )


@pytest.mark.parametrize(
    "section, typo, close",
    [("train_loader", "strems", "streams"), ("optimizer", "lrr", "lr"), ("model", "hidden_sizee", "hidden_size")],
)
def test_an_unknown_key_names_its_path_and_the_close_valid_key(corpus, tmp_path, capsys, section, typo, close):
    recipe = tiny_recipe(corpus, tmp_path / "runs")
    recipe[section][typo] = recipe[section].pop(close, 1.0)
    error = train_error(recipe, tmp_path, capsys)
    assert error.startswith(f"flexbert: error: {section}.{typo}: unknown key; did you mean '{close}'? valid keys are:")


def test_a_key_of_an_earlier_version_says_what_replaced_it(corpus, tmp_path, capsys):
    recipe = tiny_recipe(corpus, tmp_path / "runs", debug={"log_sample_ids": True})
    error = train_error(recipe, tmp_path, capsys)
    assert error.startswith(
        "flexbert: error: debug: retired: its one key, log_sample_ids, became data_order.record, which is on by default"
    )


@pytest.mark.parametrize("in_yaml", [True, False], ids=["yaml", "override"])
def test_a_wrong_type_names_the_key_and_the_value(corpus, tmp_path, capsys, in_yaml):
    recipe = tiny_recipe(corpus, tmp_path / "runs")
    if in_yaml:
        recipe["train_loader"]["max_seq_len"] = "abc"
    overrides = [] if in_yaml else ["train_loader.max_seq_len=abc"]
    assert train_error(recipe, tmp_path, capsys, *overrides) == (
        "flexbert: error: train_loader.max_seq_len: expected an integer, got str 'abc'"
    )


def test_a_global_batch_the_world_size_does_not_divide(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as the composer launcher sets it
    assert train_error(tiny_recipe(corpus, tmp_path / "runs"), tmp_path, capsys) == (
        "flexbert: error: global_batch_rows: 4 rows cannot be split evenly over 3 processes"
    )


def test_an_hsdp_replica_count_the_world_size_does_not_divide(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    recipe = tiny_recipe(corpus, tmp_path / "runs", global_batch_rows=8, fsdp_config={"replicate_degree": 3})
    assert train_error(recipe, tmp_path, capsys) == (
        "flexbert: error: fsdp_config.replicate_degree: 3 replicas cannot split 4 processes evenly"
    )
    recipe = tiny_recipe(corpus, tmp_path / "runs", fsdp_config={"state_dict_type": "monolithic"})
    assert train_error(recipe, tmp_path, capsys).startswith(
        "flexbert: error: fsdp_config.state_dict_type: must be one of ['sharded', 'full']"
    )


@pytest.mark.parametrize("precision", ["amp_bf16", "amp_fp16"])
def test_mixed_precision_without_a_gpu(corpus, tmp_path, capsys, precision):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")  # CPU CI always runs it
    assert train_error(tiny_recipe(corpus, tmp_path / "runs", precision=precision), tmp_path, capsys) == (
        f"flexbert: error: precision: {precision} needs a GPU, and this machine has none; use fp32 or auto"
    )


@pytest.mark.parametrize(
    "optimizer, expected",
    [
        (
            {"name": "stable_adamw", "muon": {"lr": 0.02}},
            "optimizer.muon: only the muon optimizer reads this section; optimizer.name is 'stable_adamw'",
        ),
        (
            {"name": "muon"},
            "optimizer.name: muon steps the 2-D weights of the encoder's layers, and this model has no "
            "trainable one; choose stable_adamw or decoupled_adamw",
        ),
    ],
)
def test_muon_settings_without_muon_or_muon_without_matrices(
    corpus, tmp_path, capsys, monkeypatch, optimizer, expected
):
    """A ``muon:`` section under another optimizer; Muon on layers of norms alone, which leave it no
    matrix to orthogonalise (both recipes build such layers; the first is refused before the model)."""
    monkeypatch.setattr(LAYER, "_entries", dict(LAYER._entries))  # the layer below leaves with the test
    LAYER.add("norm_only", NormOnlyLayer)
    recipe = tiny_recipe(corpus, tmp_path / "runs", optimizer=optimizer, **{"model.blocks": {"layer": "norm_only"}})
    assert train_error(recipe, tmp_path, capsys) == f"flexbert: error: {expected}"


class NormOnlyLayer(torch.nn.Module):
    """An encoder layer of one norm: vectors, no matrix."""

    layer_type = "global"

    def __init__(self, config, layer_idx):
        super().__init__()
        self.norm = build_norm(config)

    def forward(self, hidden, context):
        return self.norm(hidden)


# --- data --------------------------------------------------------------------------------------------


def test_a_missing_stream_folder(corpus, tmp_path, capsys):
    recipe = tiny_recipe(corpus, tmp_path / "runs", **{"train_loader.streams.web.local": str(tmp_path / "nowhere")})
    assert train_error(recipe, tmp_path, capsys) == (
        f"flexbert: error: train_loader.streams.web.local: no MDS dataset at {tmp_path / 'nowhere'} "
        f"({tmp_path / 'nowhere' / 'index.json'} missing)"
    )


def test_a_missing_input_to_data_prep(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert convert_error(tmp_path, capsys, missing) == (f"flexbert: error: input not found: {missing} does not exist")


def test_an_empty_stream(corpus, tmp_path, capsys):
    with MDSWriter(out=str(tmp_path / "empty"), columns={"input_ids": "ndarray:uint16"}):
        pass  # an index with no shards, as a conversion of nothing would leave
    recipe = tiny_recipe(corpus, tmp_path / "runs", **{"train_loader.streams.web.local": str(tmp_path / "empty")})
    assert train_error(recipe, tmp_path, capsys) == (
        f"flexbert: error: train_loader.streams.web.local: the MDS dataset at {tmp_path / 'empty'} holds no samples"
    )


SCHEDULE = {"shape": "linear", "start": 0.3, "end": 0.05}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            {"train_loader.masking": {"mlm_probability": 1.0}},
            "train_loader.masking.mlm_probability: must be in (0, 1), got 1.0",
        ),
        (
            {"train_loader.masking": {"mlm_probability": {**SCHEDULE, "end": 0.0}}},
            "train_loader.masking.mlm_probability.end: must be in (0, 1), got 0.0",
        ),
        (
            {"train_loader.masking": {"mlm_probability": {"shape": "steps", "values": [0.3, 0.1], "at": [0.4, 0.6]}}},
            "train_loader.masking.mlm_probability.at: gives 2 fractions for 2 values; each value after the first "
            "starts at one fraction of the phase, so give one fewer",
        ),
        (
            {"train_loader.masking": {"mlm_probability": SCHEDULE}, "max_duration": "1ep"},
            "max_duration: train_loader.masking.mlm_probability's schedule runs over the phase, whose length '1ep' "
            "does not give before training; give it in tokens (tok), samples (sp) or batches (ba)",
        ),
        ({"train_loader.temperature": 0.0}, "train_loader.temperature: must be > 0, got 0.0"),
        (
            {"train_loader.temperature": 0.7, "train_loader.streams.code.repeat": 2.0},
            "train_loader.streams.code.repeat: train_loader.temperature sets every stream's proportion from its "
            "token count; remove this key",
        ),
        (
            {"train_loader.temperature": 0.7, "train_loader.streams.web": {"remote": "s3://bucket/web"}},
            "train_loader.streams.web.remote: train_loader.temperature counts each stream's tokens in its shards, "
            "which a remote stream has only as training downloads them; name a local copy (local, without "
            "remote) or give proportions",
        ),
    ],
)
def test_a_bad_mask_rate_or_temperature(corpus, tmp_path, capsys, overrides, expected):
    recipe = tiny_recipe(corpus, tmp_path / "runs", **overrides)
    assert train_error(recipe, tmp_path, capsys) == f"flexbert: error: {expected}"


def test_a_mask_rate_schedule_in_the_eval_loader(corpus, tmp_path, capsys):
    evaluation = {"streams": {"web": {"local": str(corpus / "web")}}, "masking": {"mlm_probability": SCHEDULE}}
    assert train_error(tiny_recipe(corpus, tmp_path / "runs", eval_loader=evaluation), tmp_path, capsys) == (
        "flexbert: error: eval_loader.masking.mlm_probability: evaluation masks at one rate, so that its losses "
        "compare over the run; give a number"
    )


@pytest.mark.parametrize(
    "columns, compression, holds",
    [
        ({"text": "str"}, "zstd", "holds {'text': 'str'}"),
        ({"input_ids": "ndarray:uint16"}, "gz", "is compressed with gz"),
    ],
)
def test_temperature_on_a_stream_whose_tokens_it_cannot_count(corpus, tmp_path, capsys, columns, compression, holds):
    with MDSWriter(out=str(tmp_path / "other"), columns=columns, compression=compression) as writer:
        writer.write({"text": "a document"} if "text" in columns else {"input_ids": np.arange(5, dtype=np.uint16)})
    overrides = {"train_loader.temperature": 0.7, "train_loader.streams.web.local": str(tmp_path / "other")}
    error = train_error(tiny_recipe(corpus, tmp_path / "runs", **overrides), tmp_path, capsys)
    assert error.startswith("flexbert: error: train_loader.streams.web: temperature ") and holds in error, error


@pytest.mark.parametrize("corpus_kind", ["no documents", "no input files"])
def test_data_prep_input_without_documents(tmp_path, capsys, corpus_kind):
    folder = tmp_path / "corpus"
    folder.mkdir()
    if corpus_kind == "no documents":
        write_jsonl(folder / "a.jsonl", ["", ""])
        (folder / "b.txt").write_text("")
        expected = f"flexbert: error: empty corpus: no document with any text in {folder}"
    else:
        (folder / "notes.csv").write_text("not,a,corpus\n")
        expected = f"flexbert: error: no input files under {folder}: looked for"
    assert convert_error(tmp_path, capsys, folder).startswith(expected)


def middle_shard(stream: Path) -> Path:
    shards = sorted(stream.glob("shard.*.mds.zstd"))
    assert len(shards) >= 3
    return shards[len(shards) // 2]


def test_a_truncated_shard_is_refused_before_training(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus", {"web": [300] * 400, "code": [40] * 10})
    shard = middle_shard(corpus / "web")
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    error = train_error(tiny_recipe(corpus, tmp_path / "runs"), tmp_path, capsys)
    assert error == (
        f"flexbert: error: train_loader.streams.web.local: shard file {shard} is truncated or corrupt: "
        f"{size // 2:,} bytes where index.json records {size:,}; convert or copy the dataset again"
    )


@pytest.mark.parametrize("reader", ["in step", "behind the prefetch"])
def test_a_garbled_shard_stops_the_epoch_naming_its_file(tmp_path, monkeypatch, reader):
    # Same size, so only reading it can tell. Whether the reader or streaming's prefetch thread meets
    # it first, the epoch must stop: streaming alone ends it early and quietly in the second case.
    stream = write_stream(tmp_path, "web", [300] * 400, vocab=400)
    shard = middle_shard(stream)
    data = bytearray(shard.read_bytes())
    data[64:-16] = np.random.default_rng(0).bytes(len(data) - 80)
    shard.write_bytes(bytes(data))
    if reader == "behind the prefetch":
        get_item = DocumentDataset.get_item
        monkeypatch.setattr(DocumentDataset, "get_item", lambda *args: time.sleep(0.01) or get_item(*args))
    loader = PackedMLMLoader(loader_config(streams_at(stream)), load_tokenizer(TOKENIZER), 50368)
    with pytest.raises(DataError) as error:
        list(loader)
    assert str(error.value).startswith(f"train_loader.streams.web: shard {shard} is corrupt or unreadable (")
    if reader == "behind the prefetch":
        assert loader.dataset.background_error is error.value
    assert not shard.with_suffix("").exists() and not leftovers(stream)  # no half-decompressed copy


# --- the tokenizer, the model and their sizes ------------------------------------------------------


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"model.vocab_size": 1000}, "model.vocab_size: 1000 is smaller than the 50368 tokens of {tokenizer}"),
        (
            {"model.pad_token_id": 0},
            "model.pad_token_id: 0 disagrees with the tokenizer {tokenizer}, whose id is 50283",
        ),
    ],
)
def test_a_tokenizer_that_does_not_fit_the_model(corpus, tmp_path, capsys, override, expected):
    recipe = tiny_recipe(corpus, tmp_path / "runs", **override)
    assert train_error(recipe, tmp_path, capsys) == "flexbert: error: " + expected.format(tokenizer=TOKENIZER)


def test_a_loader_refuses_a_tokenizer_larger_than_the_model(corpus):
    with pytest.raises(
        DataError, match=f"train_loader.tokenizer: {TOKENIZER} has 50368 tokens but the model's vocab_size is 1000"
    ):
        PackedMLMLoader(loader_config(streams_at(corpus / "web")), load_tokenizer(TOKENIZER), model_vocab_size=1000)


def test_token_ids_beyond_the_model_vocabulary(tmp_path):
    wide = write_stream(tmp_path, "wide", [50, 60], vocab=70000, dtype=np.uint32)
    loader = PackedMLMLoader(loader_config(streams_at(wide)), load_tokenizer(TOKENIZER), 50368)
    with pytest.raises(DataError) as error:
        list(loader)
    reported = re.fullmatch(
        r"stream 'wide' sample \d: token id (\d+) is outside the model's vocabulary \(50368\)", str(error.value)
    )
    assert reported is not None and int(reported[1]) >= 50368, error.value


@pytest.fixture
def tiny_checkpoint(corpus, tmp_path) -> Path:
    """A Composer-format checkpoint (the layout training saves) of the tiny recipe's encoder."""
    model = FlexBertForMaskedLM(TrainConfig.from_dict(tiny_recipe(corpus, tmp_path)).model_config)
    path = tmp_path / "tiny.pt"
    torch.save({"state": {"model": {f"model.{name}": t for name, t in model.state_dict().items()}}}, path)
    return path


def test_a_missing_checkpoint(corpus, tmp_path, capsys):
    recipe = tiny_recipe(corpus, tmp_path / "runs", load_path=str(tmp_path / "nope.pt"))
    assert train_error(recipe, tmp_path, capsys) == (
        f"flexbert: error: load_path: checkpoint not found: {tmp_path / 'nope.pt'}"
    )


def test_a_checkpoint_from_another_architecture_is_refused_before_training(corpus, tmp_path, tiny_checkpoint):
    from flexbert.core.checkpoint import check_checkpoint_matches

    wider = FlexBertForMaskedLM(
        TrainConfig.from_dict(tiny_recipe(corpus, tmp_path, **{"model.hidden_size": 64})).model_config
    )
    with pytest.raises(ConfigError) as error:
        check_checkpoint_matches(str(tiny_checkpoint), wider)
    assert str(error.value).startswith(
        f"load_path: {tiny_checkpoint} was saved from a different architecture: "
        "model.embeddings.tok_embeddings.weight: checkpoint (50368, 32) vs model (50368, 64);"
    )

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=f"^load_path: {truncated} is not a readable Composer checkpoint"):
        check_checkpoint_matches(str(truncated), wider)


class _RunsCodeWhenUnpickled:
    """What a hostile checkpoint could hold: unpickling it calls a function of the attacker's choice
    (here one that writes a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_reading_weights_never_runs_code_stored_in_a_checkpoint(corpus, tmp_path, tiny_checkpoint, capsys):
    from flexbert.core.checkpoint import read_weights

    marker = tmp_path / "code-ran"
    hostile = tmp_path / "hostile.pt"
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    torch.save({**checkpoint, "extra": _RunsCodeWhenUnpickled(marker)}, hostile)
    with pytest.raises(pickle.UnpicklingError, match="it holds getattr, which reading weights never unpickles"):
        read_weights(hostile)
    # export-hf reads weights the same way: it refuses the file in one line.
    error = one_line_error(cli_main(["export-hf", str(hostile), str(tmp_path / "hf")]), capsys)
    assert error.startswith(f"flexbert: error: {hostile} is not a readable Composer checkpoint (it holds getattr")
    assert not marker.exists() and not (tmp_path / "hf").exists()
    weights, _ = read_weights(tiny_checkpoint)  # while an honest one reads back whole
    assert weights.keys() == {name.removeprefix("model.") for name in checkpoint["state"]["model"]}


def test_exporting_a_checkpoint_with_another_architecture_writes_nothing(corpus, tmp_path, tiny_checkpoint, capsys):
    recipe = write_recipe(tmp_path / "wider.yaml", tiny_recipe(corpus, tmp_path, **{"model.hidden_size": 64}))
    out = tmp_path / "hf"
    error = one_line_error(cli_main(["export-hf", str(tiny_checkpoint), str(out), "--config", str(recipe)]), capsys)
    assert error.startswith(
        f"flexbert: error: {tiny_checkpoint} does not hold the model its config describes: "
        "size mismatch for model.embeddings.tok_embeddings.weight: copying a param with shape "
        "torch.Size([50368, 32]) from checkpoint, the shape in current model is "
        "torch.Size([50368, 64])."
    )
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("loader", ["train_loader", "eval_loader"])
def test_a_loader_sequence_longer_than_the_model_positions(corpus, tmp_path, capsys, loader):
    recipe = tiny_recipe(corpus, tmp_path / "runs", **{"model.max_position_embeddings": 64})
    recipe["eval_loader"] = {**recipe["train_loader"]}
    recipe[loader] = {**recipe[loader], "max_seq_len": 128}
    assert train_error(recipe, tmp_path, capsys) == (
        f"flexbert: error: {loader}.max_seq_len: 128 exceeds model.max_position_embeddings=64"
    )


def test_fine_tuning_sequences_longer_than_the_model_positions(corpus, tmp_path, capsys):
    recipe = {
        "run_name": "tiny-task",
        "run_root": str(tmp_path / "runs"),
        "tokenizer": str(TOKENIZER),
        "model": {**tiny_recipe(corpus, tmp_path)["model"], "max_position_embeddings": 256},
        "task": {"metrics": ["accuracy"]},
        "train_split": {"path": str(tmp_path / "train.tsv")},
        "eval_splits": {"dev": {"path": str(tmp_path / "dev.tsv")}},
        "max_seq_len": 512,
    }
    assert train_error(recipe, tmp_path, capsys) == (
        "flexbert: error: max_seq_len: 512 exceeds model.max_position_embeddings=256"
    )


def test_a_packed_document_longer_than_the_model_positions():
    model = FlexBertForMaskedLM(tiny_config(max_position_embeddings=32))
    cu_seqlens = torch.tensor([0, 10, 50], dtype=torch.int32)  # the second document has 40 tokens
    with pytest.raises(ValueError, match="^a document of 40 tokens exceeds max_position_embeddings=32$"):
        model(torch.randint(3, 256, (50,)), cu_seqlens=cu_seqlens, max_seqlen=40)


# --- data_prep: text that is not UTF-8, a full disk --------------------------------------------------


def test_a_text_file_that_is_not_utf8(tmp_path, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("A fine document.")
    (folder / "b.txt").write_bytes(b"Latin-1, not UTF-8: caf\xe9")
    assert convert_error(tmp_path, capsys, folder).startswith(
        f"flexbert: error: 1 of 2 records are bad (invalid_utf8: 1, first in {folder / 'b.txt'}, byte 23; "
        "text field 'text'), more than --max-bad-fraction 0.001"
    )


def test_json_lines_that_are_not_utf8(tmp_path, capsys):
    good = b"".join(b'{"text": "document %d"}\n' % index for index in range(8))
    corpus = tmp_path / "a.jsonl"
    corpus.write_bytes(good + b'{"text": "caf\xe9"}\n' + good + b'{"text": "\xff"}\n')
    error = convert_error(tmp_path, capsys, corpus, max_bad_fraction="0.05")
    assert error.startswith(
        f"flexbert: error: 2 of 18 records are bad (invalid_utf8: 2, first in {corpus}, "
        f"the line at byte {len(good)}; text field 'text'), more than --max-bad-fraction 0.05"
    )


def fill_the_disk_at(monkeypatch, step: str, number: int) -> None:
    """Make the ``number``-th shard or unit record written run out of space halfway through its file."""
    from streaming.base.format.base.writer import Writer

    calls, write_bytes, process_file = [], Path.write_bytes, Writer._process_file

    def half_written(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == number:
            write_bytes(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write_bytes(path, data)

    if step == "shard":

        def shard_file(writer, raw_data, raw_basename, zip_basename):
            infos = process_file(writer, raw_data, raw_basename, zip_basename)
            written = Path(writer.local, zip_basename or raw_basename)
            half_written(written, written.read_bytes())
            return infos

        monkeypatch.setattr(Writer, "_process_file", shard_file)
    else:

        def unit_record(path: Path, data: bytes) -> None:
            (half_written if path.name.startswith("unit-") and path.suffix == ".partial" else write_bytes)(path, data)

        monkeypatch.setattr(Path, "write_bytes", unit_record)


@pytest.mark.parametrize("step", ["shard", "record"])
def test_a_full_disk_during_data_prep_leaves_a_resumable_output(tmp_path, capsys, monkeypatch, step):
    documents = [f"Document number {index}: " + "some words " * (index % 13) for index in range(60)]
    corpus = write_jsonl(tmp_path / "a.jsonl", documents)
    out = tmp_path / "out"
    argv = [
        "--input",
        str(corpus),
        "--output",
        str(out),
        "--tokenizer",
        str(TOKENIZER),
        "--workers",
        "1",
        "--unit-size",
        "256",
        "--no-progress",
    ]
    with monkeypatch.context() as patch:
        fill_the_disk_at(patch, step, 3)
        error = one_line_error(convert_command_line()(argv), capsys)
    assert error.startswith(f"flexbert: error: no space left on the device while writing {out} (")
    assert error.endswith(
        "the units finished so far are kept: free some space and run the same command again to resume"
    )
    # As documented: no index.json, the finished units recorded, no half unit and no partial file.
    assert not (out / "index.json").exists()
    assert sorted(path.name for path in (out / "conversion").glob("unit-*")) == ["unit-00000.json", "unit-00001.json"]
    assert not leftovers(out)
    if step == "shard":
        assert not (out / "unit-00002").exists()

    summary = convert_to_mds([corpus], out, TOKENIZER, workers=1, unit_size=256, progress=False)
    assert summary.resumed_units == 2 and summary.total.documents == len(documents)


# --- remote streams ------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the probe is closed


def test_an_unreachable_remote_stream_fails_after_bounded_retries(corpus, tmp_path, capsys, monkeypatch):
    for name, value in {
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    recipe = tiny_recipe(
        corpus,
        tmp_path / "runs",
        **{
            "train_loader.streams": {"web": {"remote": "s3://bucket/path", "local": str(tmp_path / "cache")}},
            "train_loader.download_retry": 2,
            "train_loader.download_timeout": 5.0,
        },
    )
    started = time.monotonic()
    error = train_error(recipe, tmp_path, capsys)
    assert time.monotonic() - started < 60
    assert error.startswith(
        "flexbert: error: train_loader.streams.web.remote: cannot read "
        "s3://bucket/path/index.json after 2 attempts (EndpointConnectionError: "
    )
    assert not any((tmp_path / "cache").rglob("*"))  # no partial index left in the cache
