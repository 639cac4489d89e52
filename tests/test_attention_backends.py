"""All attention backends agree with the package's eager backend, the plain softmax attention
that defines the semantics, on values and gradients."""

import sys

import flash_stand_in
import pytest
import torch
from conftest import tiny_config

from flexbert.core.model import DocumentLayout, FlexBertForMaskedLM
from flexbert.core.model.backends import resolve_backend
from flexbert.core.model.backends.flex import _FLEX_BLOCK, backward_runs_on_cpu, document_block_mask, prepare_flex
from flexbert.core.model.backends.sdpa import _length_groups
from flexbert.core.model.layout import flash3_available, flash_attn_available
from flexbert.core.model.registries import ATTENTION_BACKENDS

HEADS, HEAD_DIM = 2, 16
SCALE = HEAD_DIM**-0.5

LAYOUTS = {
    "long_docs_beyond_window": [300, 170],
    "short_docs_inside_window": [20, 50, 7],
    "single_token_docs": [1, 1, 5, 1, 1],
    "equal_full_rows": [256, 256],  # the grid is the stream itself: no scatter, no padding mask
    "lengths_in_several_groups": [700, 9, 300, 64, 65, 130, 2],  # sdpa: one grid per length group
    "empty_documents": [0, 90, 0],  # all-padding rows of a padded batch; alone in their length group
    "many_docs_one_packed_row": [
        int(n) for n in torch.randint(1, 60, (40,), generator=torch.Generator().manual_seed(3))
    ],
}
WINDOWS = {"global": None, "local_128": 64, "local_8": 4}
MASKS = {"bidirectional": False, "causal": True}  # an encoder's attention, a decoder's


def cu_seqlens_from_lengths(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def trains_on(backend: str, device: str = "cpu") -> bool:
    """Whether ``backend`` backpropagates on ``device`` with this torch (FlexAttention on a CPU stopped
    at torch 2.11); where it does not, its forward is still compared."""
    return backend != "flex" or device != "cpu" or backward_runs_on_cpu()


def run_attention(backend, lengths, half_window, dtype=torch.float32, device="cpu", causal=False):
    """The output and, where the backend trains here, the gradients of q, k and v."""
    gen = torch.Generator().manual_seed(sum(lengths))
    total = sum(lengths)
    q, k, v, grad_out = (torch.randn(total, HEADS, HEAD_DIM, generator=gen) for _ in range(4))
    q, k, v = (x.to(device, dtype).requires_grad_(trains_on(backend, device)) for x in (q, k, v))
    layout = DocumentLayout.from_cu_seqlens(cu_seqlens_from_lengths(lengths).to(device), max(lengths), total)
    out = ATTENTION_BACKENDS.get(backend)(layout, half_window, SCALE, causal=causal)(q, k, v, 0.0)
    if not trains_on(backend, device):
        return [out.float().cpu()]
    out.backward(grad_out.to(device, dtype))
    return [t.float().cpu() for t in (out, q.grad, k.grad, v.grad)]


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_backend_matches_eager_fp32(backend, layout, window, mask):
    expected = run_attention("eager", LAYOUTS[layout], WINDOWS[window], causal=MASKS[mask])
    actual = run_attention(backend, LAYOUTS[layout], WINDOWS[window], causal=MASKS[mask])
    assert len(actual) == (4 if trains_on(backend) else 1)
    for name, a, e in zip(("output", "dq", "dk", "dv"), actual, expected):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, e, atol=1e-5, rtol=0, msg=f"{backend} {name} differs")


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("window", WINDOWS)
def test_eager_is_one_masked_softmax_over_the_stream(window, mask):
    """The oracle itself, against the semantics written another way: one score matrix over the whole
    stream, with every pair that crosses a document or the window (or, causal, looks ahead) masked out."""
    lengths = [300, 1, 170, 5]
    total, half_window = sum(lengths), WINDOWS[window]
    q, k, v = (torch.randn(total, HEADS, HEAD_DIM) for _ in range(3))
    scores = torch.einsum("qhd,khd->hqk", q, k) * SCALE
    scores = scores.masked_fill(~element_mask(lengths, half_window, total, MASKS[mask]), float("-inf"))
    expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    layout = DocumentLayout.from_cu_seqlens(cu_seqlens_from_lengths(lengths), max(lengths), total)
    actual = ATTENTION_BACKENDS.get("eager")(layout, half_window, SCALE, causal=MASKS[mask])(q, k, v, 0.0)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_window_really_limits_attention():
    """The local window must change results on long documents; if it were ignored this fails."""
    lengths = LAYOUTS["long_docs_beyond_window"]
    local = run_attention("sdpa", lengths, 64)[0]
    global_ = run_attention("sdpa", lengths, None)[0]
    assert (local - global_).abs().max() > 1e-3
    # ... while inside the window, tokens near the start see the same keys either way.
    short = [50]
    torch.testing.assert_close(run_attention("flex", short, 64)[0], run_attention("flex", short, None)[0])


@pytest.mark.parametrize("window", WINDOWS)
def test_causal_attention_never_sees_a_later_token(window):
    """Changing the keys and values from position 37 of a document on leaves every earlier output of
    every backend unchanged, and changes the later ones."""
    lengths = [60, 200]
    layout = DocumentLayout.from_cu_seqlens(cu_seqlens_from_lengths(lengths), max(lengths), sum(lengths))
    q, k, v = (torch.randn(sum(lengths), HEADS, HEAD_DIM) for _ in range(3))
    k2, v2 = k.clone(), v.clone()
    k2[37:60] += 5.0
    v2[37:60] -= 3.0
    for backend in ("eager", "sdpa", "flex"):
        attend = ATTENTION_BACKENDS.get(backend)(layout, WINDOWS[window], SCALE, causal=True)
        before, after = attend(q, k, v, 0.0), attend(q, k2, v2, 0.0)
        torch.testing.assert_close(before[:37], after[:37], msg=backend)
        torch.testing.assert_close(before[60:], after[60:], msg=backend)
        assert (before[37:60] - after[37:60]).abs().max() > 1e-2, backend


def test_documents_do_not_see_each_other():
    """Changing one document's keys must leave every other document's outputs unchanged."""
    lengths = [30, 40, 25]
    cu = cu_seqlens_from_lengths(lengths)
    layout = DocumentLayout.from_cu_seqlens(cu, 40, sum(lengths))
    q, k, v = (torch.randn(sum(lengths), HEADS, HEAD_DIM) for _ in range(3))
    k2, v2 = k.clone(), v.clone()
    k2[30:70] += 5.0
    v2[30:70] -= 3.0
    for backend in ("eager", "sdpa", "flex"):
        attend = ATTENTION_BACKENDS.get(backend)(layout, None, SCALE)
        before, after = attend(q, k, v, 0.0), attend(q, k2, v2, 0.0)
        torch.testing.assert_close(before[:30], after[:30])
        torch.testing.assert_close(before[70:], after[70:])
        assert (before[30:70] - after[30:70]).abs().max() > 1e-2


def test_auto_resolves_to_sdpa_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("flex", torch.device("cpu")) == "flex"


@pytest.mark.parametrize(
    "fa3, fa2, capability, expected",
    [
        (True, True, (9, 0), "flash3"),  # Hopper with FlashAttention-3
        (True, True, (8, 0), "flash"),  # FA3 runs on Hopper only
        (False, True, (9, 0), "flash"),
        (True, False, (8, 6), "flex"),
        (False, False, (9, 0), "flex"),
    ],
)
def test_auto_picks_the_fastest_installed_kernel_on_a_gpu(monkeypatch, fa3, fa2, capability, expected):
    from flexbert.core.model import backends

    monkeypatch.setattr(backends, "flash3_available", lambda: fa3)
    monkeypatch.setattr(backends, "flash_attn_available", lambda: fa2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_backend("auto", torch.device("cuda", 0)) == expected


def test_flash3_is_refused_where_it_cannot_run(monkeypatch):
    import importlib.util

    from flexbert.core.model import FlexBertConfig
    from flexbert.typed_config import ConfigError

    if flash3_available():
        pytest.skip("FlashAttention-3 is installed")  # CPU CI never has it
    with pytest.raises(ConfigError, match=r"model.attn_backend: 'flash3' needs FlashAttention-3"):
        FlexBertConfig.from_dict({"attn_backend": "flash3"}, path="model")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: object() if name == "flash_attn_interface" else find_spec(name, *args),
    )
    FlexBertConfig.from_dict({"attn_backend": "flash3"}, path="model")  # installed: accepted
    with pytest.raises(ConfigError, match="FlashAttention-3 cannot drop attention probabilities"):
        FlexBertConfig.from_dict({"attn_backend": "flash3", "attention_probs_dropout": 0.1}, path="model")


@pytest.mark.parametrize("backend", ["flash", "flash3"])
def test_flash_kernels_match_eager_bf16(backend):
    """On every layout and window. The CPU twins: sdpa and flex against the same oracle above,
    and the kernel selection; bench/gpu_check.py repeats this on the lent GPU."""
    available = {"flash": flash_attn_available, "flash3": flash3_available}[backend]
    if not (torch.cuda.is_available() and available()):
        pytest.skip(f"{backend} needs a CUDA GPU and its package")
    for layout in LAYOUTS:
        for window in WINDOWS:
            expected = run_attention("eager", LAYOUTS[layout], WINDOWS[window], device="cuda")
            actual = run_attention(backend, LAYOUTS[layout], WINDOWS[window], dtype=torch.bfloat16, device="cuda")
            for a, e in zip(actual, expected):
                torch.testing.assert_close(a, e, atol=2e-2, rtol=2e-2, msg=f"{layout} {window}")


def test_sdpa_groups_documents_by_length_on_the_cpu():
    """Each group holds documents within a factor of two (all under 64 together), and the groups'
    tokens are the stream's tokens, each exactly once, in document order within a group."""
    lengths = LAYOUTS["lengths_in_several_groups"]
    layout = DocumentLayout.from_cu_seqlens(cu_seqlens_from_lengths(lengths), max(lengths), sum(lengths))
    groups = _length_groups(layout)
    group_lengths = sorted(sorted((g.cu_seqlens[1:] - g.cu_seqlens[:-1]).tolist()) for _, g in groups)
    assert group_lengths == [[2, 9, 64], [65], [130], [300], [700]]
    tokens = torch.cat([t for t, _ in groups])
    assert sorted(tokens.tolist()) == list(range(sum(lengths)))
    starts = cu_seqlens_from_lengths(lengths)[:-1].tolist()
    small = next(t for t, g in groups if g.num_docs == 3)
    assert small.tolist() == [
        *range(starts[1], starts[1] + 9),
        *range(starts[3], starts[3] + 64),
        *range(starts[6], starts[6] + 2),
    ]


# --- FlexAttention's block mask -------------------------------------------------------------------


def element_mask(lengths, half_window, padded_len, causal=False):
    """[padded, padded] whether query i may see key j: same document (tail padding being one more),
    within the window on local layers, and j <= i when causal. A brute-force reference, for small
    streams only."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    doc = torch.cat([doc, torch.full((padded_len - len(doc),), -1)])
    allowed = doc[:, None] == doc[None, :]
    if half_window is not None:
        position = torch.arange(padded_len)
        allowed &= (position[:, None] - position[None, :]).abs() <= half_window
    if causal:
        allowed &= torch.ones(padded_len, padded_len, dtype=torch.bool).tril()
    return allowed


def listed_blocks(counts, indices):
    return {(i, int(j)) for i, (n, row) in enumerate(zip(counts[0, 0].tolist(), indices[0, 0])) for j in row[:n]}


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("layout", [*LAYOUTS, "block_spanning_two_long_docs"])
def test_flex_block_mask_lists_exactly_the_blocks_the_mask_touches(layout, window, mask):
    """A listed block that the mask never touches wastes work; a touched block left out, or a partly
    masked block marked full, gives wrong attention on a GPU (where the kernel skips unlisted blocks;
    the CPU's eager flex evaluates every pair, so the oracle test above cannot see this)."""
    lengths = {"block_spanning_two_long_docs": [1000, 1000, 30]}.get(layout) or LAYOUTS[layout]
    total, half_window = sum(lengths), WINDOWS[window]
    padded = -(-total // _FLEX_BLOCK) * _FLEX_BLOCK
    layout_ = DocumentLayout.from_cu_seqlens(cu_seqlens_from_lengths(lengths), max(lengths), total)
    causal = MASKS[mask]
    mask = document_block_mask(layout_, half_window, padded, causal)
    allowed = element_mask(lengths, half_window, padded, causal)
    blocks = allowed.unflatten(0, (-1, _FLEX_BLOCK)).unflatten(2, (-1, _FLEX_BLOCK))
    touched = blocks.any(dim=(1, 3)).nonzero().tolist()
    whole = blocks.all(dim=(1, 3)).nonzero().tolist()
    partial = listed_blocks(mask.kv_num_blocks, mask.kv_indices)
    full = listed_blocks(mask.full_kv_num_blocks, mask.full_kv_indices)
    assert partial | full == {tuple(b) for b in touched} and not partial & full
    assert full == {tuple(b) for b in whole}
    # Each key block's query blocks: the same pairs, listed the other way round.
    by_key = (
        listed_blocks(mask.q_num_blocks, mask.q_indices),
        listed_blocks(mask.full_q_num_blocks, mask.full_q_indices),
    )
    assert by_key == ({(j, i) for i, j in partial}, {(j, i) for i, j in full})


@pytest.mark.parametrize("rows, row_tokens", [(96, 1024), (12, 8192)])
def test_flex_mask_preparation_never_builds_a_tokens_by_tokens_tensor(rows, row_tokens):
    """A recipe-scale microbatch (96 x 1024 tokens in phase 1, 12 x 8192 in context extension), packed
    with documents of every length: no tensor made while preparing its masks holds more than a few
    dozen values per token (a tokens x tokens one would hold 98,304 per token)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    gen = torch.Generator().manual_seed(0)
    lengths = []
    for _ in range(rows):  # each row filled by documents of random lengths, the last one cut to fit
        room = row_tokens
        while room:
            lengths.append(min(room, int(torch.randint(1, row_tokens + 1, (1,), generator=gen))))
            room -= lengths[-1]
    total = rows * row_tokens
    largest = []

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            largest.append(
                max((t.numel() for t in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(t)), default=0)
            )
            return out

    layout = DocumentLayout.from_cu_seqlens(cu_seqlens_from_lengths(lengths), max(lengths), total)
    with Largest():
        for half_window in (None, 64):
            prepare_flex(layout, half_window, SCALE)
    assert max(largest) <= 64 * total, f"{max(largest):,} values for {total:,} tokens"


# --- flash and flash3 on a CPU, through stand-ins of their libraries (tests/flash_stand_in.py) -------


@pytest.fixture
def flash_stand_ins(monkeypatch) -> list[dict]:
    """``flash_attn`` and ``flash_attn_interface`` importable as their stand-ins; the calls made to them."""
    for name, module in flash_stand_in.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    flash_stand_in.CALLS.clear()
    return flash_stand_in.CALLS


def bf16_exact(lengths, seed):
    """q, k, v and an output gradient that bf16 holds exactly, so that the kernels' cast loses nothing."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(sum(lengths), HEADS, HEAD_DIM, generator=gen).bfloat16().float() for _ in range(4)]


# Not head_dim ** -0.5, the kernels' default: a scale that is not passed on would go unnoticed.
UNUSUAL_SCALE = 0.4


def attention_with_grads(backend, lengths, half_window, inputs, causal=False):
    q, k, v, grad_out = (x.clone().requires_grad_(x is not inputs[3]) for x in inputs)
    layout = DocumentLayout.from_cu_seqlens(cu_seqlens_from_lengths(lengths), max(lengths), sum(lengths))
    out = ATTENTION_BACKENDS.get(backend)(layout, half_window, UNUSUAL_SCALE, causal=causal)(q, k, v, 0.0)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["flash", "flash3"])
def test_flash_kernels_match_eager_through_their_stand_ins(flash_stand_ins, backend, layout, window, mask):
    """Our calls of each varlen kernel, forward and backward, over packed documents and windows: the
    stand-in computes what the library documents for the arguments we pass, so a wrong argument
    order, scale, window or layout shows up as a difference from the eager definition."""
    lengths, half_window = LAYOUTS[layout], WINDOWS[window]
    inputs = bf16_exact(lengths, seed=len(lengths))
    causal = MASKS[mask]
    actual = attention_with_grads(backend, lengths, half_window, inputs, causal)
    expected = attention_with_grads("eager", lengths, half_window, inputs, causal)
    for name, a, e in zip(("output", "dq", "dk", "dv"), actual, expected):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        torch.testing.assert_close(a, e, atol=2e-2, rtol=2e-2, msg=f"{backend} {name}")  # bf16 output
    library = {"flash": "flash_attn", "flash3": "flash_attn_interface"}[backend]
    reach = -1 if half_window is None else half_window
    window_size = (reach, 0 if causal else reach)
    assert {call["library"] for call in flash_stand_ins} == {library}
    assert all(call["window_size"] == window_size and call["causal"] == causal for call in flash_stand_ins)
    if backend == "flash":
        assert all(call["dropout_p"] == 0.0 for call in flash_stand_ins)


@pytest.mark.parametrize("backend", ["flash", "flash3"])
def test_a_model_trains_on_the_flash_kernels_as_on_eager(flash_stand_ins, backend):
    """The whole encoder on flash or flash3 (chosen by name, as a recipe would): loss and every
    gradient as with the eager backend, within bf16 attention's precision."""
    lengths = [70, 3, 1, 33, 90]
    stream = torch.randint(3, 256, (sum(lengths),), generator=torch.Generator().manual_seed(3))
    labels = torch.where(torch.rand(stream.shape) < 0.3, stream, torch.full_like(stream, -100))
    results = {}
    for name in ("eager", backend):
        torch.manual_seed(1)
        model = FlexBertForMaskedLM(tiny_config(attn_backend=name, num_hidden_layers=3, local_attention=16))
        out = model(stream, labels=labels, cu_seqlens=cu_seqlens_from_lengths(lengths), max_seqlen=max(lengths))
        out.loss.backward()
        results[name] = out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    (loss, grads), (expected_loss, expected_grads) = results[backend], results["eager"]
    assert flash_stand_ins, "the model never called the kernel"
    torch.testing.assert_close(loss, expected_loss, atol=1e-2, rtol=0)
    for name, grad in expected_grads.items():
        relative = (grads[name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert relative < 3e-2, f"{name}: relative gradient difference {relative:.3f}"


@pytest.mark.parametrize(
    "change, error",
    [
        ({"dtype": torch.float32}, "fp16 and bf16"),
        ({"cu_dtype": torch.int64}, "int32"),
        ({"max_seqlen": torch.tensor(5)}, "Python int"),
        ({"window_size": 4}, "pair"),
        ({"dropout_p": 0.1, "library": "flash_attn_interface"}, "dropout_p"),
    ],
)
def test_the_stand_ins_refuse_what_the_kernels_refuse(change, error):
    """The stand-ins have teeth: each wrong call a real kernel refuses fails here too."""
    lengths = [3, 5]
    q = torch.randn(8, HEADS, HEAD_DIM).to(change.get("dtype", torch.bfloat16))
    cu = cu_seqlens_from_lengths(lengths).to(change.get("cu_dtype", torch.int32))
    longest = change.get("max_seqlen", 5)
    function = flash_stand_in.modules()[change.get("library", "flash_attn")].flash_attn_varlen_func
    options = {"window_size": change.get("window_size", (-1, -1))}
    if "dropout_p" in change:
        options["dropout_p"] = change["dropout_p"]
    with pytest.raises((RuntimeError, TypeError), match=error):
        function(q, q, q, cu, cu, longest, longest, softmax_scale=SCALE, causal=False, **options)
