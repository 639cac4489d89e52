"""The packed MLM loader over streamed MDS mixtures: coverage, mixture, resume, DDP, bad input."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from conftest import TOKENIZER
from data_helpers import document_tokens, random_lengths, write_stream

from flexbert.core.model.losses import IGNORE_INDEX
from flexbert.core.tokenizer import load_tokenizer
from flexbert.data.loader import PackedMLMLoader
from flexbert.data.streams import LoaderConfig, stream_tokens
from flexbert.typed_config import ConfigError, from_dict

pytestmark = [
    pytest.mark.xdist_group("streaming")  # see test_remote_streaming.py
]
LENGTHS = {"web": random_lengths(120, seed=1), "code": random_lengths(80, seed=2, high=2500)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for seed, (name, lengths) in enumerate(LENGTHS.items()):
        write_stream(root, name, lengths, seed=seed)
    return root


def loader_config(corpus, streams=None, **overrides) -> LoaderConfig:
    values = dict(
        tokenizer=str(TOKENIZER),
        max_seq_len=256,
        rows_per_batch=4,
        sample_batch_size=8,
        epochs=1,
        streams=streams or {name: {"local": str(corpus / name)} for name in LENGTHS},
    )
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
        for (stream, sample, start, end), a, b in zip(
            batch.piece_keys.tolist(), batch.cu_seqlens[:-1], batch.cu_seqlens[1:]
        ):
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
    streams = {
        "web": {"local": str(corpus / "web"), "proportion": 0.75},
        "code": {"local": str(corpus / "code"), "proportion": 0.25},
    }
    loader = make_loader(loader_config(corpus, streams, epoch_size=400))
    documents = {}
    for batch in loader:
        for stream, _sample, start, _ in batch.piece_keys.tolist():
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
        assert np.array_equal(a.piece_keys, b.piece_keys)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)


# --- mmBERT's schedules: the mask rate over a phase, and proportions by temperature ---------------------


def test_a_mask_rate_schedule_moves_over_the_phase_and_resumes_exactly(corpus):
    config = loader_config(corpus, masking={"mlm_probability": {"shape": "linear", "start": 0.3, "end": 0.05}})

    def make() -> PackedMLMLoader:  # a phase of 12 batches of 4 rows
        return PackedMLMLoader(config, load_tokenizer(config.tokenizer), model_vocab_size=50368, phase_rows=48)

    loader = make()
    uninterrupted = [(loader.mask_rate, batch) for batch, _ in zip(loader, range(14))]
    rates = [rate for rate, _ in uninterrupted]
    assert rates == pytest.approx([0.3 - 0.25 * k / 12 for k in range(13)] + [0.05])  # then held at its end
    masked = [(batch.labels != IGNORE_INDEX).float().mean().item() for _, batch in uninterrupted]
    assert masked[0] > 0.25 and masked[-1] < 0.08

    interrupted = make()
    stream = iter(interrupted)
    head = [(interrupted.mask_rate, batch) for _, batch in zip(range(5), stream)]  # no sixth batch drawn
    state = interrupted.state_dict()
    del stream, interrupted
    resumed = make()
    resumed.load_state_dict(state)
    replay = head + [(resumed.mask_rate, batch) for batch, _ in zip(resumed, range(9))]
    for (rate, a), (replayed_rate, b) in zip(uninterrupted, replay, strict=True):
        assert rate == replayed_rate and np.array_equal(a.piece_keys, b.piece_keys)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)


def test_a_schedule_needs_a_training_phase(corpus):
    config = loader_config(corpus, masking={"mlm_probability": {"shape": "constant", "value": 0.2}})
    with pytest.raises(ConfigError, match=r"^train_loader\.masking\.mlm_probability: a schedule runs over a training"):
        make_loader(config)


def test_temperature_proportions_come_from_the_streams_tokens_and_go_into_streaming(corpus):
    loader = make_loader(loader_config(corpus, temperature=0.5))
    tokens = {name: sum(lengths) for name, lengths in LENGTHS.items()}
    mixture = loader.dataset.mixture
    assert mixture.tokens == tokens
    weights = {name: count**0.5 for name, count in tokens.items()}
    assert mixture.proportions == pytest.approx({name: w / sum(weights.values()) for name, w in weights.items()})
    # streaming draws with them as if the recipe had given them
    assert [stream.proportion for stream in loader.dataset.streams] == list(mixture.proportions.values())
    lines = mixture.table("train_loader").splitlines()
    assert lines[0] == "train_loader: stream proportions proportional to tokens^0.5"
    natural = tokens["web"] / sum(tokens.values())
    assert lines[2].split() == ["web", f"{tokens['web']:,}", f"{natural:.1%}", f"{mixture.proportions['web']:.1%}"]


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("compressed", [True, False])
def test_token_counts_are_exact_whatever_width_each_length_is_stored_in(tmp_path, dtype, compressed):
    # streaming stores a sample's length in 1, 2 or 4 bytes, whichever is the narrowest that holds it.
    lengths = [1, 255, 256, 65535, 65536, *random_lengths(300, seed=5, low=1, high=700)]
    stream = write_stream(tmp_path, "lengths", lengths, dtype=dtype)
    if not compressed:  # as streaming leaves a shard it has read, decompressed beside its zstd file
        for zipped in stream.glob("*.zstd"):
            zipped.with_suffix("").write_bytes(zstandard.decompress(zipped.read_bytes()))
            zipped.unlink()
    assert stream_tokens("train_loader.streams.lengths", stream) == sum(lengths)


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
            env={
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
        )
        for rank in range(2)
    ]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    full = [json.loads((tmp_path / f"rank{r}_full.json").read_text()) for r in range(2)]
    resumed = [json.loads((tmp_path / f"rank{r}_resumed.json").read_text()) for r in range(2)]
    documents = [{(s, d) for keys in rank for s, d, start, _ in keys if start == 0} for rank in full]
    assert documents[0] and documents[1] and not documents[0] & documents[1]
    # The ranks pack their equal shares into different numbers of rows, yet end at the same batch:
    # the longer rank drops its excess (under a batch of rows), so nearly every document is seen.
    assert len(full[0]) == len(full[1])
    assert len(documents[0] | documents[1]) >= 0.95 * sum(len(v) for v in LENGTHS.values())
    state = json.loads((tmp_path / "rank0_state.json").read_text())
    assert state["ranks"][0]["consumed"] != state["ranks"][1]["consumed"]
    for r in range(2):
        assert resumed[r] == full[r]
