"""The encoder's architecture, unpadded and packed execution, and backend agreement end to end."""

import math

import pytest
import torch
from conftest import tiny_config

from flexbert.core.model import DocumentLayout, FlexBertForMaskedLM
from flexbert.core.model.backends.flex import backward_runs_on_cpu


def stream_and_cu(lengths, vocab_size=256):
    ids = torch.randint(3, vocab_size, (sum(lengths),))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, cu


# --- unpadding and packing --------------------------------------------------------------------


def test_padded_api_equals_unpadded_stream():
    model = FlexBertForMaskedLM(tiny_config()).eval()
    lengths = [40, 23, 7]
    input_ids = torch.zeros(3, 40, dtype=torch.long)
    attention_mask = torch.zeros(3, 40, dtype=torch.long)
    stream, cu = stream_and_cu(lengths)
    for row, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        input_ids[row, : end - start] = stream[start:end]
        attention_mask[row, : end - start] = 1
    padded = model(input_ids, attention_mask).logits  # [3, 40, V]
    unpadded = model(stream, cu_seqlens=cu, max_seqlen=40).logits  # [T, V]
    torch.testing.assert_close(padded[attention_mask.bool()], unpadded, atol=1e-6, rtol=0)


def test_padding_content_and_amount_do_not_change_real_tokens():
    model = FlexBertForMaskedLM(tiny_config()).eval()
    ids = torch.randint(3, 256, (1, 30))
    short = model(ids, torch.ones_like(ids)).logits
    junk = torch.cat([ids, torch.randint(3, 256, (1, 50))], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 50, dtype=torch.long)], dim=1)
    long = model(junk, mask).logits
    torch.testing.assert_close(long[:, :30], short, atol=1e-6, rtol=0)
    assert (long[:, 30:] == 0).all()


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_packed_row_equals_documents_run_alone(backend):
    """Attention never crosses a document boundary and RoPE positions restart per document."""
    model = FlexBertForMaskedLM(tiny_config(attn_backend=backend)).eval()
    lengths = [37, 1, 60, 12, 5]  # longer and shorter than the window of 16, and a 1-token doc
    stream, cu = stream_and_cu(lengths)
    with torch.no_grad():
        packed = model(stream, cu_seqlens=cu).logits
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            alone = model(stream[start:end][None]).logits[0]
            torch.testing.assert_close(packed[start:end], alone, atol=1e-5, rtol=0)


def test_layout_positions_restart_per_document():
    layout = DocumentLayout.from_cu_seqlens(torch.tensor([0, 3, 4, 8], dtype=torch.int32), None, 8)
    assert layout.positions.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert layout.doc_ids.tolist() == [0, 0, 0, 1, 2, 2, 2, 2]
    assert layout.max_seqlen == 4


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_whole_model_backends_agree_on_outputs_and_gradients(backend):
    """A training step's encoder output, loss and every gradient equal those of the eager backend."""
    lengths = [70, 3, 1, 33, 90]
    stream, cu = stream_and_cu(lengths)
    labels = torch.where(torch.rand(stream.shape) < 0.3, stream, torch.full_like(stream, -100))
    # FlexAttention has no backward on a CPU from torch 2.11 on: there its forward is compared alone.
    trains = backend != "flex" or backward_runs_on_cpu()
    results = {}
    for name in ("eager", backend):
        torch.manual_seed(1)
        model = FlexBertForMaskedLM(tiny_config(attn_backend=name))
        with torch.set_grad_enabled(trains):
            out = model(stream, labels=labels, cu_seqlens=cu, max_seqlen=90)
        if trains:
            out.loss.backward()
        results[name] = (out.hidden_states, out.loss, {n: p.grad for n, p in model.named_parameters()})
    (hidden, loss, grads), (expected_hidden, expected_loss, expected_grads) = results[backend], results["eager"]
    assert hidden.shape == (sum(lengths), 64) and hidden.abs().max() > 0.1
    torch.testing.assert_close(hidden, expected_hidden, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=0)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=0, msg=name)


def test_document_longer_than_max_positions_is_refused():
    model = FlexBertForMaskedLM(tiny_config(max_position_embeddings=32))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=32"):
        model(torch.randint(3, 256, (1, 33)))


# --- MLM head and sparse prediction -------------------------------------------------------------


def test_sparse_prediction_equals_dense_logits_at_labelled_tokens():
    ids = torch.randint(3, 256, (2, 50))
    labels = torch.full_like(ids, -100)
    labels[0, [3, 17, 40]] = ids[0, [3, 17, 40]]
    labels[1, [0, 49]] = ids[1, [0, 49]]
    sparse_model = FlexBertForMaskedLM(tiny_config(sparse_prediction=True)).eval()
    dense_model = FlexBertForMaskedLM(tiny_config(sparse_prediction=False)).eval()
    dense_model.load_state_dict(sparse_model.state_dict())
    with torch.no_grad():
        sparse = sparse_model(ids, labels=labels)
        dense = dense_model(ids, labels=labels)
    assert sparse.logits.shape == (5, 256)
    torch.testing.assert_close(sparse.logits, dense.logits[labels != -100])
    torch.testing.assert_close(sparse.loss, dense.loss)
    expected = torch.nn.functional.cross_entropy(dense.logits[labels != -100], labels[labels != -100])
    torch.testing.assert_close(sparse.loss, expected)
    assert torch.equal(sparse.predictions, sparse.logits.argmax(-1))


def mlm_loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad()
    output = model(ids, labels=labels, **kwargs)
    output.loss.backward()
    return output, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_chunked_training_loss_equals_whole_logits(autocast_dtype):
    """Training computes the loss chunk by chunk, with gradients taken in the forward pass; loss,
    every gradient and the predictions equal the plain path through whole logits."""
    ids = torch.randint(3, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3, ids, -100)
    model = FlexBertForMaskedLM(tiny_config(loss_chunk_tokens=7))  # several chunks and a ragged last one
    assert (labels != -100).sum() > 3 * 7
    with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        chunked, chunked_grads = mlm_loss_and_grads(model, ids, labels)
        model.loss_fn.from_hidden = None  # the plain path: whole logits, autograd through them
        plain, plain_grads = mlm_loss_and_grads(model, ids, labels)
    assert chunked.logits is None and plain.logits is not None
    tolerance = {} if autocast_dtype is None else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(chunked.loss, plain.loss, **tolerance)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, msg=f"gradient of {name}", **tolerance)
    agree = (chunked.predictions == plain.logits.argmax(-1)).float().mean()
    assert agree == 1.0 if autocast_dtype is None else agree > 0.9


def test_masked_index_from_the_host_equals_finding_it_on_the_device():
    lengths = [30, 25]
    ids = torch.randint(3, 256, (sum(lengths),))
    labels = torch.full_like(ids, -100)
    labels[::4] = ids[::4]
    cu = torch.tensor([0, 30, 55], dtype=torch.int32)
    model = FlexBertForMaskedLM(tiny_config())
    found, found_grads = mlm_loss_and_grads(model, ids, labels, cu_seqlens=cu, max_seqlen=30)
    given, given_grads = mlm_loss_and_grads(
        model, ids, labels, cu_seqlens=cu, max_seqlen=30, masked_index=torch.arange(0, sum(lengths), 4)
    )
    torch.testing.assert_close(given.loss, found.loss, rtol=0, atol=0)
    for name, grad in found_grads.items():
        torch.testing.assert_close(given_grads[name], grad, rtol=0, atol=0)


# --- architecture details from the spec ----------------------------------------------------------


def test_modernbert_structure():
    config = tiny_config(num_hidden_layers=7)
    model = FlexBertForMaskedLM(config)
    layers = model.model.layers
    assert isinstance(layers[0].attn_norm, torch.nn.Identity)
    assert all(isinstance(layer.attn_norm, torch.nn.LayerNorm) for layer in layers[1:])
    assert [layer.layer_type for layer in layers] == ["global", "local", "local", "global", "local", "local", "global"]
    assert model.decoder.weight is model.model.embeddings.tok_embeddings.weight
    biases = [name for name, _ in model.named_parameters() if name.endswith("bias")]
    assert biases == ["decoder.bias"]
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings != 256]
    assert model.model.layers[1].mlp.Wi.out_features == 2 * config.intermediate_size


def test_geglu_gates_the_second_half():
    model = FlexBertForMaskedLM(tiny_config())
    mlp = model.model.layers[0].mlp
    x = torch.randn(5, 64)
    hidden = mlp.Wi(x)
    input, gate = hidden[:, :96], hidden[:, 96:]
    expected = mlp.Wo(torch.nn.functional.gelu(input) * gate)
    torch.testing.assert_close(mlp(x), expected)


def test_swiglu_rounds_its_width_and_gates_with_silu():
    config = tiny_config(hidden_activation="relu", blocks={"mlp": {"name": "swiglu", "multiple_of": 64}})
    mlp = FlexBertForMaskedLM(config).model.layers[0].mlp
    assert (mlp.Wi.out_features, mlp.Wo.in_features) == (2 * 128, 128)  # 96 rounded up to 128
    x = torch.randn(5, 64)
    input, gate = mlp.Wi(x).chunk(2, dim=-1)
    torch.testing.assert_close(mlp(x), mlp.Wo(torch.nn.functional.silu(input) * gate))
    unrounded = FlexBertForMaskedLM(tiny_config(blocks={"mlp": "swiglu"})).model.layers[0].mlp
    assert unrounded.Wo.in_features == 96


def test_init_follows_the_spec():
    config = tiny_config(
        hidden_size=256, num_attention_heads=4, intermediate_size=512, vocab_size=4096, num_hidden_layers=8
    )
    model = FlexBertForMaskedLM(config)
    out_std = 0.02 / math.sqrt(2 * 8)
    checks = {
        "model.embeddings.tok_embeddings.weight": 0.02,
        "model.layers.3.attn.Wqkv.weight": 0.02,
        "model.layers.3.mlp.Wi.weight": 0.02,
        "head.dense.weight": 0.02,
        "model.layers.3.attn.Wo.weight": out_std,
        "model.layers.3.mlp.Wo.weight": out_std,
    }
    params = dict(model.named_parameters())
    for name, sigma in checks.items():
        weight = params[name]
        assert weight.abs().max() <= 2 * sigma + 1e-9, name  # truncated at ±2σ
        # a normal truncated at ±2σ has std ≈ 0.88σ
        assert weight.std().item() == pytest.approx(0.88 * sigma, rel=0.05), name
    assert torch.equal(params["model.final_norm.weight"], torch.ones(256))
    assert torch.equal(params["decoder.bias"], torch.zeros(4096))


def test_rope_theta_change_applies_immediately():
    model = FlexBertForMaskedLM(tiny_config(global_rope_theta=10_000.0, local_rope_theta=10_000.0)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.attn.Wqkv.weight.mul_(8.0)  # sharp attention, so positions matter
    ids = torch.randint(3, 256, (1, 64))
    before = model(ids).logits
    model.set_rope_theta(global_theta=160_000.0)
    after = model(ids).logits
    assert (before - after).abs().max() > 1e-3
    model.set_rope_theta(global_theta=10_000.0)
    torch.testing.assert_close(model(ids).logits, before)


@pytest.mark.parametrize(
    "blocks",
    [
        {"norm": "rmsnorm"},
        {"mlp": "mlp"},
        {"layer": "postnorm"},
        {"embeddings": "learned_absolute", "attention": "plain"},
    ],
)
def test_ablation_blocks_train(blocks):
    config = tiny_config(blocks=blocks)
    model = FlexBertForMaskedLM(config)
    ids = torch.randint(3, 256, (2, 40))
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, -100))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_learned_positions_restart_per_document():
    config = tiny_config(blocks={"embeddings": "learned_absolute", "attention": "plain"})
    model = FlexBertForMaskedLM(config).eval()
    stream, cu = stream_and_cu([20, 30])
    packed = model(stream, cu_seqlens=cu).logits
    torch.testing.assert_close(packed[20:], model(stream[20:][None]).logits[0], atol=1e-5, rtol=0)
    assert model.model.embeddings.position_embeddings.num_embeddings == 1024


# --- fine-tuning heads ----------------------------------------------------------------------------


def test_sequence_classifier_pools_each_packed_document():
    from flexbert.core.model import FlexBertForSequenceClassification

    stream, cu = stream_and_cu([30, 1, 12])
    for pooling in ("cls", "mean"):
        model = FlexBertForSequenceClassification(tiny_config(), num_labels=3, pooling=pooling).eval()
        packed = model(stream, cu_seqlens=cu).logits
        assert packed.shape == (3, 3)
        for doc, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            hidden = model.model.encode(stream[start:end][None]).hidden  # [L, H]
            pooled = hidden[0] if pooling == "cls" else hidden.mean(0)
            torch.testing.assert_close(packed[doc], model.classify(pooled), atol=1e-5, rtol=0)


def test_classifier_losses_and_init():
    from flexbert.core.model import FlexBertForSequenceClassification, FlexBertForTokenClassification

    ids = torch.randint(3, 256, (4, 16))
    regression = FlexBertForSequenceClassification(tiny_config(), num_labels=1)
    targets = torch.tensor([0.5, 1.0, 4.0, 2.5])
    out = regression(ids, labels=targets)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), targets))
    tagger = FlexBertForTokenClassification(tiny_config(), num_labels=5)
    labels = torch.randint(0, 5, (4, 16))
    labels[:, :3] = -100
    out = tagger(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[:, 3:].reshape(-1, 5), labels[:, 3:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    wide = FlexBertForSequenceClassification(tiny_config(hidden_size=256, intermediate_size=384), num_labels=2000)
    weight = wide.classifier.weight
    assert weight.abs().max() <= 2 * 256**-0.5 and weight.std().item() == pytest.approx(0.88 * 256**-0.5, rel=0.05)


@pytest.mark.parametrize("grad", [False, True])
def test_rotary_turns_each_pair_of_halves_by_its_angle(grad):
    """RoPE (rotate-half layout): dimension i and i + d/2 of a head form a complex number turned by
    position × theta^(-2i/d). Both ways apply_rotary computes it (in place when no gradient is
    needed, as when encoding; out of place for training) equal that rotation."""
    from flexbert.core.model.attention import RotaryTables, apply_rotary

    tokens, heads, head_dim, theta = 37, 3, 16, 10_000.0
    positions = torch.tensor([*range(20), *range(17)])  # two documents
    x = torch.randn(tokens, heads, head_dim, requires_grad=grad)
    cos, sin = RotaryTables(head_dim).lookup(positions, 64, theta)
    with torch.set_grad_enabled(grad):
        rotated = apply_rotary(x, cos, sin)
    frequencies = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    turn = torch.polar(torch.ones(tokens, head_dim // 2, dtype=torch.float64), positions[:, None] * frequencies)
    pairs = torch.complex(x[..., : head_dim // 2].double(), x[..., head_dim // 2 :].double()) * turn[:, None]
    expected = torch.cat((pairs.real, pairs.imag), dim=-1).float()
    torch.testing.assert_close(rotated, expected, atol=1e-5, rtol=1e-5)
    assert rotated.requires_grad == grad


def test_rotary_gradient_is_the_opposite_turn():
    """apply_rotary's hand-written backward pass (the output's gradient turned back by the opposite
    angle) against autograd's numerical gradient, in fp64."""
    from flexbert.core.model.attention import RotaryTables, apply_rotary

    tokens, heads, head_dim = 11, 2, 8
    positions = torch.tensor([*range(6), *range(5)])
    cos, sin = RotaryTables(head_dim).lookup(positions, 16, 10_000.0)
    x = torch.randn(tokens, 2, heads, head_dim, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cos.double(), sin.double()), (x,))
