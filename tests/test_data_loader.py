"""The packed MLM loader over streamed MDS mixtures: coverage, mixture, resume, DDP, bad input."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import document_tokens, random_lengths, write_stream

from flexbert.data.loader import PackedMLMLoader
from flexbert.data.masking import IGNORE_INDEX
from flexbert.data.streams import LoaderConfig
from flexbert.data.tokenizer import load_tokenizer
from flexbert.typed_config import ConfigError, from_dict

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER = SHARED / "tokenizers" / "modernbert"
pytestmark = [
    pytest.mark.skipif(not TOKENIZER.is_dir(), reason=f"needs the ModernBERT tokenizer at {TOKENIZER}"),
    pytest.mark.xdist_group("streaming"),  # see test_remote_streaming.py
]
LENGTHS = {"web": random_lengths(120, seed=1), "code": random_lengths(80, seed=2, high=2500)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for seed, (name, lengths) in enumerate(LENGTHS.items()):
        write_stream(root, name, lengths, seed=seed)
    return root


def loader_config(corpus, streams=None, **overrides) -> LoaderConfig:
    values = dict(tokenizer=str(TOKENIZER), max_seq_len=256, rows_per_batch=4, sample_batch_size=8, epochs=1,
                  streams=streams or {name: {"local": str(corpus / name)} for name in LENGTHS})
    values.update(overrides)
    return from_dict(LoaderConfig, values, "train_loader")


def make_loader(config: LoaderConfig) -> PackedMLMLoader:
    return PackedMLMLoader(config, load_tokenizer(config.tokenizer), model_vocab_size=50368)


def originals(batch):
    """Undo the masking: the original token at every position."""
    return torch.where(batch.labels != IGNORE_INDEX, batch.labels, batch.input_ids)


def test_one_epoch_covers_every_document_exactly_once(corpus):
    loader = make_loader(loader_config(corpus))
    spans = {}
    for batch in loader:
        assert batch.num_rows <= 4 and batch.max_seqlen <= 256
        tokens = originals(batch)
        for (stream, sample, start, end), a, b in zip(batch.piece_keys.tolist(), batch.cu_seqlens[:-1], batch.cu_seqlens[1:]):
            piece = tokens[a:b]
            assert piece[0] == 50281 and piece[-1] == 50282  # [CLS] ... [SEP]
            spans.setdefault((stream, sample), {})[start] = (end, piece[1:-1].numpy())
    offsets = {0: 0, 1: len(LENGTHS["web"])}
    assert len(spans) == sum(len(v) for v in LENGTHS.values())
    for (stream, sample), chunks in spans.items():
        index = sample - offsets[stream]
        expected = document_tokens(stream, index, list(LENGTHS.values())[stream][index])
        rebuilt = np.concatenate([chunks[start][1] for start in sorted(chunks)])
        assert np.array_equal(rebuilt, expected)  # whole document, chunked, never truncated
    assert loader.packing_efficiency > 0.95


def test_mixture_proportions(corpus):
    streams = {"web": {"local": str(corpus / "web"), "proportion": 0.75},
               "code": {"local": str(corpus / "code"), "proportion": 0.25}}
    loader = make_loader(loader_config(corpus, streams, epoch_size=400))
    documents = {}
    for batch in loader:
        for stream, sample, start, _ in batch.piece_keys.tolist():
            if start == 0:
                documents[stream] = documents.get(stream, 0) + 1
    assert documents[0] + documents[1] == 400
    assert documents[0] / 400 == pytest.approx(0.75, abs=0.01)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_reproduces_the_uninterrupted_run(corpus, num_workers):
    config = loader_config(corpus, num_workers=num_workers, epochs=2, sample_batch_size=4)
    uninterrupted = list(make_loader(config))
    interrupted = make_loader(config)
    stream = iter(interrupted)
    head = [next(stream) for _ in range(len(uninterrupted) // 2 + 3)]  # mid-way through epoch 1
    state = interrupted.state_dict()
    del stream, interrupted
    assert state["ranks"][0]["epoch"] == 1 and state["ranks"][0]["pending"]
    resumed = make_loader(config)
    resumed.load_state_dict(state)
    replay = head + list(resumed)
    assert len(replay) == len(uninterrupted)
    for a, b in zip(replay, uninterrupted):
        assert torch.equal(a.piece_keys, b.piece_keys)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_WORKER = Path(__file__).with_name("ddp_loader_worker.py")


def test_ddp_ranks_get_distinct_data_and_resume_exactly(corpus, tmp_path):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(DDP_WORKER), str(corpus), str(TOKENIZER), str(tmp_path)],
            env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                 "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
        )
        for rank in range(2)
    ]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    full = [torch.load(tmp_path / f"rank{r}_full.pt") for r in range(2)]
    resumed = [torch.load(tmp_path / f"rank{r}_resumed.pt") for r in range(2)]
    documents = [{(s, d) for keys in rank for s, d, start, _ in keys.tolist() if start == 0} for rank in full]
    assert documents[0] and documents[1] and not documents[0] & documents[1]
    assert len(documents[0] | documents[1]) == sum(len(v) for v in LENGTHS.values())
    for r in range(2):
        assert len(resumed[r]) == len(full[r])
        assert all(torch.equal(a, b) for a, b in zip(resumed[r], full[r]))


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("streams,key_path,message", [
    ({}, "train_loader.streams", "no streams"),
    ({"web": {"proportion": 0.5, "local": "X"}, "code": {"repeat": 2.0, "local": "X"}},
     "train_loader.streams.code.proportion", "every stream must"),
    ({"web": {"proportion": 0.5, "repeat": 2.0, "local": "X"}}, "train_loader.streams.web", "give one of"),
    ({"web": {"proportion": -1.0, "local": "X"}}, "train_loader.streams.web.proportion", "must be > 0"),
    ({"web": {}}, "train_loader.streams.web", "needs a remote or a local"),
])
def test_bad_stream_configs(corpus, streams, key_path, message):
    streams = {k: {**v, "local": str(corpus / "web")} if v.get("local") == "X" else v for k, v in streams.items()}
    config = loader_config(corpus)
    config.streams = from_dict(LoaderConfig, {"tokenizer": "t", "streams": streams}, "train_loader").streams
    with pytest.raises(ConfigError, match=message) as info:
        make_loader(config)
    assert info.value.key_path == key_path

# More bad input (missing, empty or corrupt streams, vocabulary mismatches) is in test_bad_inputs.py.


def test_stale_shared_memory_from_a_killed_run_is_cleaned(corpus, tmp_path):
    script = (
        "import os, signal, sys\n"
        "from streaming import StreamingDataset\n"
        f"ds = StreamingDataset(local={str(corpus / 'web')!r}, batch_size=4)\n"
        "next(iter(ds))\n"
        "print(ds._shm_prefix_int, flush=True)\n"
        "os.killpg(os.getpgid(0), signal.SIGKILL)  # takes the resource tracker down too\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], start_new_session=True, capture_output=True, text=True)
    prefix = f"{int(killed.stdout.split()[-1]):06d}_"
    leaked = {name for name in os.listdir("/dev/shm") if name.startswith(prefix)}
    assert leaked, "the killed run should have left shared memory behind"
    make_loader(loader_config(corpus))
    assert not leaked & set(os.listdir("/dev/shm"))


def test_mixture_recipe_validates():
    from flexbert.cli import load_yaml_config

    raw = load_yaml_config(Path(__file__).resolve().parents[1] / "yamls" / "data" / "modernbert-mixture.yaml")
    config = from_dict(LoaderConfig, raw["train_loader"], "train_loader")
    config.validate()
    assert set(config.streams) >= {"web_dclm", "code_starcoder", "science_pes2o"}
    assert sum(s.proportion for s in config.streams.values()) == pytest.approx(1.0)
    assert all(s.remote.startswith("s3://") for s in config.streams.values())


def test_packing_efficiency_on_the_demo_corpus_at_1024(tmp_path):
    """The issue's target: >= 99% real tokens per row capacity at 1024 on the embedded corpus."""
    import json

    from streaming import MDSWriter

    from flexbert.data.demo_corpus import build_demo_corpus

    build_demo_corpus(tmp_path / "corpus", progress=False)
    tokenizer = load_tokenizer(TOKENIZER)
    streams = {}
    for source in ("web", "code", "science"):
        texts = [json.loads(line)["text"] for line in (tmp_path / "corpus" / source / "part-00000.jsonl").open()]
        with MDSWriter(out=str(tmp_path / "mds" / source), columns={"input_ids": "ndarray:uint16"}) as writer:
            for ids in tokenizer.encode_batch(texts):
                writer.write({"input_ids": np.asarray(ids, dtype=np.uint16)})
        streams[source] = {"local": str(tmp_path / "mds" / source)}
    loader = make_loader(loader_config(tmp_path, streams, max_seq_len=1024, rows_per_batch=16, sample_batch_size=32))
    rows = sum(batch.num_rows for batch in loader)
    assert rows > 1000
    assert loader.packing_efficiency >= 0.99
