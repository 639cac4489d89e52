"""Device placement, proven without a GPU: a training step's batch plumbing on the meta device.

Composer moves each batch to the device before it splits or counts it (``Trainer._train_batch``).
A ``meta`` tensor stands in for a CUDA one: it has no values, so reading one on the host raises.
Most ops that mix it with a CPU tensor raise too, but not all (``searchsorted`` does not), so a
dispatch watcher fails on any op whose tensors sit on two devices. Every hook Composer calls on a
device batch runs here on meta batches, through Composer's own ``batch_to_device``, and then the
model's forward, loss and backward. What the split produces is checked against the same split on
the CPU.
"""

import numpy as np
import pytest
import torch
from composer.core import Event
from composer.devices import Device
from conftest import tiny_config
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from train_helpers import tiny_recipe, write_corpus

from flexbert.core.model import FlexBertForMaskedLM
from flexbert.core.model.backends import sdpa
from flexbert.data.loader import PackedMLMLoader
from flexbert.data.packing import PackedBatch
from flexbert.train.flops import TrainingFlops
from flexbert.train.pretrain import TrainConfig
from flexbert.train.step import ComposerMLM, data_spec

pytestmark = pytest.mark.xdist_group("streaming")  # builds a streaming dataset


class MetaDevice(Device):
    """Composer's device interface, placing tensors on ``meta``."""

    dist_backend = "gloo"
    name = "meta"
    _device = torch.device("meta")

    def module_to_device(self, module):
        return module.to("meta")

    def tensor_to_device(self, tensor):
        return tensor.to("meta")

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class DevicesMustNotMix(TorchDispatchMode):
    """Fails on any op given tensors on two devices (a CPU scalar excepted: CUDA kernels take those)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        devices = {t.device.type for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            raise AssertionError(f"{func} mixes tensors on {sorted(devices)}")
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def cpu_batches(tmp_path_factory):
    """Real batches from the packed loader as Composer receives them: several documents per row,
    long documents split over rows, and a batch that opens with the last rows of an epoch."""
    root = tmp_path_factory.mktemp("placement")
    corpus = write_corpus(root / "corpus", {"web": [20, 150, 7, 90, 33, 61, 5], "code": [120, 44, 9, 70]})
    config = TrainConfig.from_dict(tiny_recipe(corpus, root / "runs"))
    loader = PackedMLMLoader(config.train_loader, config.tokenizer, config.model_config.vocab_size, batch_rows=6)
    spec = data_spec(loader)
    batches = []
    for batch in spec.dataloader:
        batches.append(batch)
        if len(batches) == 4:
            break
    return spec, batches, config.model_config


def test_meta_refuses_host_reads_and_the_watcher_refuses_mixing():
    meta = torch.arange(4).to("meta")
    with pytest.raises(RuntimeError, match="meta"):
        int(meta[0])
    with pytest.raises(NotImplementedError):
        meta.tolist()
    with pytest.raises(AssertionError, match="mixes tensors on"), DevicesMustNotMix():
        torch.searchsorted(meta, torch.tensor([1, 2]))  # which meta alone lets through


def test_a_batch_keeps_what_the_host_needs_on_the_host(cpu_batches):
    _, batches, _ = cpu_batches
    on_device = MetaDevice().batch_to_device(batches[0])
    moved = {key for key, value in on_device.items() if torch.is_tensor(value)}
    assert moved == {"input_ids", "labels", "cu_seqlens", "masked_index"}  # no position_ids: the model never reads them
    for key in ("host_cu_seqlens", "row_pieces", "row_masked", "piece_keys"):
        assert isinstance(on_device[key], np.ndarray)
    assert {type(on_device[key]) for key in ("max_seqlen", "num_rows", "row_tokens")} == {int}


@pytest.mark.parametrize("microbatch_rows", [1, 2, 4, 6])
def test_split_and_counts_on_the_device_match_the_cpu(cpu_batches, microbatch_rows):
    spec, batches, _ = cpu_batches
    for batch in batches:
        on_cpu = spec.split_batch(batch, microbatch_rows)
        device_batch = MetaDevice().batch_to_device(batch)
        with DevicesMustNotMix():
            on_meta = spec.split_batch(device_batch, microbatch_rows)
        assert len(on_cpu) == len(on_meta) == -(-batch["num_rows"] // microbatch_rows)
        for cpu, meta in zip(on_cpu, on_meta):
            assert cpu.keys() == meta.keys()
            for key, value in cpu.items():
                if torch.is_tensor(value):
                    assert meta[key].device.type == "meta" and meta[key].shape == value.shape, key
                elif isinstance(value, np.ndarray):
                    assert np.array_equal(meta[key], value), key
                else:
                    assert meta[key] == value, key
            for token_type in ("total", "loss_generating"):
                assert spec.get_num_tokens_in_batch(meta, token_type=token_type) == spec.get_num_tokens_in_batch(
                    cpu, token_type=token_type
                )
            assert spec.get_num_samples_in_batch(meta) == spec.get_num_samples_in_batch(cpu) == cpu["num_rows"]
        assert sum(mb["num_rows"] for mb in on_meta) == batch["num_rows"]
        assert sum(spec.get_num_tokens_in_batch(mb) for mb in on_meta) == spec.get_num_tokens_in_batch(batch)


@pytest.mark.parametrize("microbatch_rows", [1, 2, 4])
def test_microbatches_are_the_rows_they_claim_to_be(cpu_batches, microbatch_rows):
    """Each CPU microbatch equals its rows collated on their own: tokens, labels, documents,
    labelled positions, longest document and piece keys."""
    spec, batches, _ = cpu_batches
    for batch in batches:
        packed = PackedBatch(**batch)
        cu = batch["cu_seqlens"].tolist()
        for index, micro in enumerate(spec.split_batch(batch, microbatch_rows)):
            first_row = index * microbatch_rows
            first_piece, end_piece = packed.row_pieces[first_row], packed.row_pieces[first_row + micro["num_rows"]]
            start, end = cu[first_piece], cu[end_piece]
            assert torch.equal(micro["input_ids"], batch["input_ids"][start:end])
            assert torch.equal(micro["labels"], batch["labels"][start:end])
            assert micro["cu_seqlens"].tolist() == [c - start for c in cu[first_piece : end_piece + 1]]
            assert micro["host_cu_seqlens"].tolist() == micro["cu_seqlens"].tolist()
            labelled = torch.nonzero(micro["labels"] != -100).squeeze(1)
            assert torch.equal(micro["masked_index"], labelled)
            assert micro["max_seqlen"] == int(torch.diff(micro["cu_seqlens"]).max())
            assert np.array_equal(micro["piece_keys"], batch["piece_keys"][first_piece:end_piece])
            rows_end = micro["row_pieces"][-1]
            assert rows_end == end_piece - first_piece and micro["row_masked"][-1] == len(labelled)


def test_the_whole_microbatch_step_runs_on_the_device(cpu_batches, monkeypatch):
    """Split, forward, loss, backward and the metric update on meta batches with a meta model, then
    the evaluation step; the MFU counter's FLOPs come from host values alone and equal the CPU batch's."""
    spec, batches, model_config = cpu_batches
    # sdpa groups documents by length only where lengths are host values; treat nothing as host.
    monkeypatch.setattr(sdpa, "GROUPING_DEVICES", ())
    config = tiny_config(
        vocab_size=model_config.vocab_size,
        pad_token_id=model_config.pad_token_id,
        cls_token_id=model_config.cls_token_id,
        sep_token_id=model_config.sep_token_id,
        local_attention=16,
        loss_chunk_tokens=16,
    )
    model = ComposerMLM(FlexBertForMaskedLM(config)).to("meta")
    flops = TrainingFlops.of(config)
    metric = model.get_metrics(is_train=True)["MaskedAccuracy"].to("meta")
    for batch in batches:
        device_batch = MetaDevice().batch_to_device(batch)
        with DevicesMustNotMix():
            spec.get_num_tokens_in_batch(device_batch)
            for micro in spec.split_batch(device_batch, 2):
                micro = MetaDevice().batch_to_device(micro)  # Composer moves each microbatch again
                outputs = model(micro)
                loss = model.loss(outputs, micro)
                assert loss.device.type == "meta" and loss.dim() == 0
                loss.backward()
                model.update_metric(micro, outputs, metric)
            counted = flops.of_batch(device_batch["host_cu_seqlens"], device_batch["masked_index"].shape[0])
        cpu_labels = batch["labels"]
        assert counted == flops.of_batch(batch["cu_seqlens"].numpy(), int((cpu_labels != -100).sum()))
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())

    # Evaluation: Composer splits the device batch the same way, then runs eval_forward without
    # gradients (the chunked per-token losses) and updates every eval metric.
    eval_metrics = {name: metric.to("meta") for name, metric in model.get_metrics(is_train=False).items()}
    with torch.no_grad(), DevicesMustNotMix():
        for micro in spec.split_batch(MetaDevice().batch_to_device(batches[0]), 3):
            outputs = model.eval_forward(micro)
            assert outputs.token_losses.device.type == "meta" and outputs.logits is None
            for metric in eval_metrics.values():
                model.update_metric(micro, outputs, metric)


def test_the_step_end_callbacks_read_no_device_value(cpu_batches, tmp_path):
    """What runs at the end of every step on the device batch: the packing and throughput monitors
    and the data-order record (whose keys are host arrays)."""
    from test_callbacks_loggers import Harness

    from flexbert.train.data_order import DataOrderRecord, read_data_order
    from flexbert.train.monitors import PackingMonitor, ThroughputMonitor

    _, batches, model_config = cpu_batches
    harness = Harness(
        PackingMonitor(),
        ThroughputMonitor(model_config, peak_tflops=1.0, window=2),
        DataOrderRecord(tmp_path, mask_seed=0),
    )
    harness.event(Event.FIT_START)
    for batch in batches:
        with DevicesMustNotMix():
            harness.train_batch(MetaDevice().batch_to_device(batch))
    assert [rows for _, rows in harness.logged("batch/rows")] == [batch["num_rows"] for batch in batches]
    assert len(harness.logged("throughput/tokens_per_sec")) == len(batches) - 1
    logged = read_data_order(tmp_path)[0]
    assert [row["pieces"] for row in logged] == [batch["piece_keys"].tolist() for batch in batches]


def test_the_exported_model_is_found_inside_any_training_wrapper(tmp_path):
    """hf_export unwraps DistributedDataParallel, torch.compile and the ComposerModel."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from flexbert.train.step import flexbert_module, full_weights

    model = FlexBertForMaskedLM(tiny_config())
    started_here = not dist.is_initialized()  # an in-process trainer of another test may have started one
    if started_here:
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        wrapped = torch.compile(DistributedDataParallel(ComposerMLM(model)))
        assert flexbert_module(wrapped) is model
        weights = full_weights(wrapped)
        assert weights.keys() == model.state_dict().keys()
        assert all(torch.equal(weights[name], tensor) for name, tensor in model.state_dict().items())
    finally:
        if started_here:
            dist.destroy_process_group()
