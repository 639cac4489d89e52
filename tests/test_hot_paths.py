"""The training step's hot paths: no host syncs, and the optional compiled regions."""

import pytest
import torch
from conftest import tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from flexbert.core.model import FlexBertForMaskedLM
from flexbert.core.model.backends import sdpa
from flexbert.train.optimizers import OPTIMIZERS
from flexbert.train.step import ComposerMLM

# Ops that make the host wait for the device: reading a value (.item(), int(), bool()), and ops
# whose output size depends on the data.
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal"}
INDEXING_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


def boolean_index(args) -> bool:
    """A boolean mask used as an index: the kernel must count its true entries first."""
    indices = args[1] if len(args) > 1 else ()
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in indices or ())


class FailOnSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS or (name in INDEXING_OPS and boolean_index(args)):
            raise AssertionError(f"aten.{name} waits for the device")
        return func(*args, **(kwargs or {}))


def packed_batch(lengths, vocab_size, mask_every=3):
    total = sum(lengths)
    input_ids = torch.randint(5, vocab_size, (total,), generator=torch.Generator().manual_seed(0))
    masked_index = torch.arange(1, total, mask_every)
    labels = torch.full_like(input_ids, -100)
    labels[masked_index] = input_ids[masked_index]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return dict(
        input_ids=input_ids, labels=labels, cu_seqlens=cu_seqlens, max_seqlen=max(lengths), masked_index=masked_index
    )


def test_the_detector_sees_a_sync():
    with pytest.raises(AssertionError, match="aten.index"), FailOnSync():
        torch.arange(5)[torch.arange(5) > 2]
    with pytest.raises(AssertionError, match="_local_scalar_dense"), FailOnSync():
        torch.ones(2).sum().item()


def test_training_step_never_waits_for_the_device(monkeypatch):
    """Forward, loss, backward, metrics and the optimizer step on a packed batch issue no op that
    would stall a GPU (checked on the CPU by watching every dispatched op). The sdpa backend groups
    documents by length only where reading lengths is free, so here the CPU is treated as a GPU."""
    monkeypatch.setattr(sdpa, "GROUPING_DEVICES", ())
    config = tiny_config(num_hidden_layers=3, local_attention=16, attn_backend="sdpa", loss_chunk_tokens=16)
    model = ComposerMLM(FlexBertForMaskedLM(config))
    optimizer = OPTIMIZERS.get("stable_adamw")(model.parameters(), lr=1e-3)
    batch = packed_batch([70, 9, 40, 1, 30], config.vocab_size)  # beyond the window, and tiny documents
    metric = model.get_metrics(is_train=True)["MaskedAccuracy"]
    for _ in range(2):  # the second step runs with the optimizer's state in place
        with FailOnSync():
            outputs = model(batch)
            model.loss(outputs, batch).backward()
            model.update_metric(batch, outputs, metric)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert 0.0 <= float(metric.compute()) <= 1.0
    assert metric.total == 2 * batch["masked_index"].shape[0]


def test_flex_block_masks_are_built_without_waiting_for_the_device():
    """FlexAttention itself is a higher-order op that no dispatch mode can watch; what it adds per
    batch is its block masks, built here under the watch. The masks so built are the right ones:
    attention through them equals the eager definition."""
    from flexbert.core.model import DocumentLayout
    from flexbert.core.model.backends.eager import prepare_eager
    from flexbert.core.model.backends.flex import prepare_flex

    batch = packed_batch([70, 9, 40, 1, 30], 256)
    layout = DocumentLayout.from_cu_seqlens(batch["cu_seqlens"], batch["max_seqlen"], 150)
    with FailOnSync():
        attends = {half_window: prepare_flex(layout, half_window, 0.25) for half_window in (None, 8)}
    q, k, v = (torch.randn(150, 2, 16) for _ in range(3))
    for half_window, attend in attends.items():
        expected = prepare_eager(layout, half_window, 0.25)(q, k, v, 0.0)
        torch.testing.assert_close(attend(q, k, v, 0.0), expected, atol=1e-5, rtol=0, msg=f"window {half_window}")


def test_compiled_regions_match_eager_and_keep_parameter_names():
    """mlp, norm and head compiled (CPU inductor here, the same code path as on a GPU): outputs and
    gradients equal eager mode, and the state dict is unchanged, so checkpoints still load."""
    torch._dynamo.reset()
    config = tiny_config(num_hidden_layers=2, local_attention=16, attn_backend="sdpa")
    eager = FlexBertForMaskedLM(config)
    compiled = FlexBertForMaskedLM(
        tiny_config(
            num_hidden_layers=2, local_attention=16, attn_backend="sdpa", compile_regions=["mlp", "norm", "head"]
        )
    )
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    regions = [name for name, module in compiled.named_modules() if module._compiled_call_impl is not None]
    assert "head" in regions and "model.layers.1.mlp" in regions and "model.final_norm" in regions
    assert "head.norm" not in regions  # inside the compiled head already
    for lengths in ([70, 9, 40], [33, 50]):  # a second token count must not need a new graph shape
        batch = packed_batch(lengths, config.vocab_size)
        results = []
        for model in (eager, compiled):
            model.zero_grad()
            output = model(
                batch["input_ids"],
                labels=batch["labels"],
                cu_seqlens=batch["cu_seqlens"],
                max_seqlen=batch["max_seqlen"],
                masked_index=batch["masked_index"],
            )
            output.loss.backward()
            results.append((output.loss, {n: p.grad for n, p in model.named_parameters()}))
        (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_unknown_compile_region_is_refused():
    from flexbert.typed_config import ConfigError

    choices = r"must be one of \['mlp', 'norm', 'head'\], got 'mlpp'$"
    with pytest.raises(ConfigError, match=r"^model\.compile_regions\[0\]: " + choices):
        tiny_config(compile_regions=["mlpp"])


def test_masked_accuracy_counts_from_ids_or_logits_alike():
    from flexbert.train.metrics import MaskedTokenAccuracy

    logits = torch.tensor([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 5.0, 0.0]])
    target = torch.tensor([1, 2, 2, -100])  # right, wrong, right, not counted
    from_logits, from_ids = MaskedTokenAccuracy(), MaskedTokenAccuracy()
    from_logits.update(logits, target)
    from_ids.update(logits.argmax(-1), target)
    assert from_logits.compute() == from_ids.compute() == pytest.approx(2 / 3)


def test_evaluation_is_chunked_and_its_metrics_exact():
    """At a recipe's microbatch the labelled tokens' logits would take 3 GB: evaluation computes
    them a chunk at a time (no [masked, vocab] tensor is ever made), and the
    cross-entropy, perplexity and accuracy equal those computed from whole logits."""
    from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
    from torch.utils import _pytree as pytree

    config = tiny_config(num_hidden_layers=2, local_attention=16, loss_chunk_tokens=16)
    model = ComposerMLM(FlexBertForMaskedLM(config)).eval()
    batch = packed_batch([70, 9, 40, 1, 30], config.vocab_size)
    vocab, chunk = config.vocab_size, config.loss_chunk_tokens
    tallest = []

    class TallestLogits(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tallest.extend(
                t.shape[0]
                for t in pytree.tree_leaves(out)
                if torch.is_tensor(t) and t.dim() == 2 and t.shape[1] == vocab
            )
            return out

    metrics = model.get_metrics(is_train=False)
    with torch.no_grad(), TallestLogits():
        outputs = model.eval_forward(batch)
        for metric in metrics.values():
            model.update_metric(batch, outputs, metric)
    masked = batch["masked_index"].shape[0]
    assert outputs.logits is None and chunk in tallest and masked > chunk
    assert masked not in tallest  # whole logits [masked, vocab] never existed (H x V is the decoder's weight)

    with torch.no_grad():
        whole = model.model(
            batch["input_ids"],
            labels=batch["labels"],
            cu_seqlens=batch["cu_seqlens"],
            max_seqlen=batch["max_seqlen"],
            masked_index=batch["masked_index"],
            return_logits=True,
        )
    targets = batch["labels"][batch["masked_index"]]
    for name, reference in (
        ("LanguageCrossEntropy", LanguageCrossEntropy()),
        ("LanguagePerplexity", LanguagePerplexity()),
    ):
        reference.update(whole.logits, targets)
        torch.testing.assert_close(metrics[name].compute(), reference.compute(), rtol=1e-6, atol=0)
    assert metrics["MaskedAccuracy"].compute() == (whole.logits.argmax(-1) == targets).float().mean()
    torch.testing.assert_close(outputs.loss, whole.loss, rtol=1e-6, atol=0)
