"""Local-window ops: native kernels vs the plain PyTorch ops vs the literal eq. (4)-(7) references."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from lmrc.ops import _native
from lmrc.ops import local_window as lw
from lmrc.ops.reference import (
    local_memory_read_reference,
    sequential_reorganise_reference,
    window_to_4d,
)

NO_COMPILER = "no working C compiler: native local-window kernels not built, only the plain fallback is tested"
TOL = 1e-5


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv("LMRC_LOCAL_WINDOW", raising=False)


@pytest.fixture
def native():
    for dtype in (torch.float32, torch.float64):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if _native.load(dtype) is None:
                pytest.skip(NO_COMPILER)


def _inputs(b, ck, cv, h, w, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # keys of moderate size: similarities of order 1-10, as with the model's scaled keys
    q = torch.randn(b, ck, h, w, generator=g, dtype=dtype) * 0.5
    k = q + torch.randn(b, ck, h, w, generator=g, dtype=dtype) * 0.5
    v = torch.randn(b, cv, h, w, generator=g, dtype=dtype)
    return q, k, v


def _max_diff(a, b):
    # -inf must sit at the same places; compare finite entries
    assert torch.equal(torch.isneginf(a), torch.isneginf(b))
    finite = torch.isfinite(b)
    return (a[finite].double() - b[finite].double()).abs().max().item() if finite.any() else 0.0


def _is_native(t):
    return t.grad_fn is not None and "Native" in type(t.grad_fn).__name__


SIZES = [(1, 13), (13, 1), (2, 3), (7, 9), (10, 12)]


@pytest.mark.parametrize("size,radius,dilation", list(itertools.product(SIZES, [0, 1, 2, 3], [1, 2])))
def test_forward_matches_plain_and_dense_reference(native, size, radius, dilation):
    h, w = size
    q, k, v = _inputs(2, 8, 5, h, w, seed=h * 100 + w)
    q.requires_grad_()  # so the outputs carry a grad_fn that names the path taken
    scale = 0.7
    read, sim, aff = lw.local_attention(q, k, v, radius, dilation, scale)
    assert _is_native(read)
    with torch.no_grad():
        sim_plain = lw.local_similarity_plain(q, k, radius, dilation, scale)
        aff_plain = torch.softmax(sim_plain, 1)
        read_plain = lw.local_weighted_sum_plain(aff_plain, v, radius, dilation)
        assert _max_diff(sim, sim_plain) <= TOL
        assert _max_diff(lw.local_similarity(q, k, radius, dilation, scale), sim_plain) <= TOL
        assert _max_diff(aff, aff_plain) <= TOL
        assert _max_diff(read, read_plain) <= TOL
        # separate weighted-sum op with arbitrary (not softmax) weights, outside entries included
        weights = torch.randn(2, (2 * radius + 1) ** 2, h, w)
        assert _max_diff(
            lw.local_weighted_sum(weights, v, radius, dilation), lw.local_weighted_sum_plain(weights, v, radius, dilation)
        ) <= TOL
        # independent dense eq. (4)-(5) in float64
        read_ref, sim_ref, aff_ref = local_memory_read_reference(q.double(), k.double(), v.double(), radius, scale, dilation)
        assert _max_diff(read, read_ref) <= TOL
        b = q.shape[0]
        assert _max_diff(window_to_4d(sim, radius, dilation, float("-inf")).reshape(b, h * w, h * w), sim_ref) <= TOL
        assert _max_diff(window_to_4d(aff, radius, dilation).reshape(b, h * w, h * w), aff_ref) <= TOL


def test_model_sized_channels_match_plain(native):
    q, k, v = _inputs(2, 64, 32, 17, 23)
    scale = 64 ** -0.5
    read, sim, aff = lw.local_attention(q, k, v, 2, 1, scale)
    sim_plain = lw.local_similarity_plain(q, k, 2, 1, scale)
    assert _max_diff(sim, sim_plain) <= TOL
    assert _max_diff(read, lw.local_weighted_sum_plain(torch.softmax(sim_plain, 1), v, 2)) <= TOL


@pytest.mark.parametrize("coarse,radius", [((3, 4), 1), ((4, 4), 2), ((2, 5), 2)])
def test_slmr_composition_matches_eq6_7_loops(native, coarse, radius):
    h, w = coarse
    g = torch.Generator().manual_seed(3)
    # arbitrary weights (not a softmax): entries pointing outside the coarse image must still be ignored
    weights = torch.rand(2, (2 * radius + 1) ** 2, h, w, generator=g)
    fine = torch.randn(2, 6, 2 * h, 2 * w, generator=g)
    fast = lw.local_weighted_sum(F.interpolate(weights, scale_factor=2, mode="nearest"), fine, radius, dilation=2)
    expected = sequential_reorganise_reference(window_to_4d(weights.double(), radius), fine.double(), radius)
    assert _max_diff(fast, expected) <= TOL
    # and with a real stage r+1 affinity from LMR
    q, k, _ = _inputs(1, 4, 1, h, w, seed=5)
    _, _, aff = lw.local_attention(q, k, torch.zeros(1, 1, h, w), radius)
    fast = lw.local_weighted_sum(F.interpolate(aff, scale_factor=2, mode="nearest"), fine[:1], radius, dilation=2)
    expected = sequential_reorganise_reference(window_to_4d(aff.double(), radius), fine[:1].double(), radius)
    assert _max_diff(fast, expected) <= TOL


GRAD_CASES = [((4, 5), 1, 1), ((5, 6), 2, 2), ((2, 3), 2, 1), ((1, 7), 1, 2)]


def _masked(t):
    return t.masked_fill(torch.isneginf(t), 0.0)


@pytest.mark.parametrize("size,radius,dilation", GRAD_CASES)
def test_gradcheck_native_float64(native, size, radius, dilation):
    h, w = size
    q, k, v = (t.requires_grad_() for t in _inputs(1, 3, 2, h, w, dtype=torch.float64, seed=7))
    weights = torch.randn(1, (2 * radius + 1) ** 2, h, w, dtype=torch.float64, requires_grad=True)
    assert _is_native(lw.local_similarity(q, k, radius, dilation, 0.6))
    assert _is_native(lw.local_weighted_sum(weights, v, radius, dilation))
    assert torch.autograd.gradcheck(lambda a, b: _masked(lw.local_similarity(a, b, radius, dilation, 0.6)), (q, k))
    assert torch.autograd.gradcheck(lambda a, b: lw.local_weighted_sum(a, b, radius, dilation), (weights, v))
    # all three outputs receive gradients, as in the model (readout, top-k of similarity, SLMR reuse of affinity)
    assert torch.autograd.gradcheck(
        lambda a, b, c: tuple(_masked(t) for t in lw.local_attention(a, b, c, radius, dilation, 0.6)), (q, k, v)
    )
    # only the readout used: the unused outputs get no gradient buffers
    assert torch.autograd.gradcheck(lambda a, b, c: lw.local_attention(a, b, c, radius, dilation, 0.6)[0], (q, k, v))


def test_fp32_gradients_match_plain_autograd(native):
    q, k, v = _inputs(2, 16, 8, 9, 11)
    g = torch.Generator().manual_seed(1)
    g_read, g_sim, g_aff = torch.randn(2, 8, 9, 11, generator=g), torch.randn(2, 25, 9, 11, generator=g), None
    g_aff = torch.randn(2, 25, 9, 11, generator=g)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        read, sim, aff = fn(*leaves)
        loss = (read * g_read).sum() + (_masked(sim) * g_sim).sum() + (aff * g_aff).sum()
        return torch.autograd.grad(loss, leaves)

    def plain(a, b, c):
        sim = lw.local_similarity_plain(a, b, 2, 1, 0.5)
        aff = torch.softmax(sim, 1)
        return lw.local_weighted_sum_plain(aff, c, 2, 1), sim, aff

    for fast, ref in zip(grads(lambda a, b, c: lw.local_attention(a, b, c, 2, 1, 0.5)), grads(plain)):
        assert (fast - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_bf16_in_bf16_out_close_to_fp32(native):
    q, k, v = _inputs(1, 16, 8, 9, 10)
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    read, sim, aff = lw.local_attention(qb, kb, vb, 2)
    assert read.dtype == sim.dtype == aff.dtype == torch.bfloat16 and _is_native(read)
    read32, sim32, aff32 = lw.local_attention(qb.float(), kb.float(), vb.float(), 2)
    assert (read.float() - read32).abs().max().item() <= 2e-2 * read32.abs().max().item()
    assert (aff.float() - aff32).abs().max().item() <= 1e-2
    read.sum().backward()
    assert qb.grad.dtype == kb.grad.dtype == vb.grad.dtype == torch.bfloat16
    wsum = lw.local_weighted_sum(aff.detach(), vb.detach(), 2)
    assert wsum.dtype == torch.bfloat16


def test_noncontiguous_inputs_and_thread_count_do_not_change_results(native):
    q, k, v = _inputs(2, 8, 6, 12, 14)
    q_cl, v_t = q.contiguous(memory_format=torch.channels_last), v.transpose(2, 3).contiguous().transpose(2, 3)
    base = lw.local_attention(q, k, v, 2, 2, 0.5)
    other = lw.local_attention(q_cl, k, v_t, 2, 2, 0.5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = lw.local_attention(q, k, v, 2, 2, 0.5)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(base, other, single):
        assert torch.equal(a, b) and torch.equal(a, c)  # rows are independent: bitwise equal whatever the split


def test_denormals_are_flushed_inside_the_kernels_only(native):
    """Horizontal neighbours give weights exp(-80) ~ 2e-35; times values of 1e-5 their terms are ~2e-40, denormal.
    The kernel flushes those to zero (a CPU takes a slow assist per denormal: trained weights on flat regions ran
    2x slower) and leaves the caller's handling of denormals as it was, on the calling thread and on the thread
    pool that PyTorch shares with the kernels."""
    h, w = 6, 40
    q = (torch.arange(h * w, dtype=torch.float32) * 10).view(1, 1, h, w)  # neighbours 10 apart, rows 400 apart
    v = torch.zeros(1, 4, h, w)
    v[..., 1::2] = 1e-5
    readout = lw.local_attention_inference(q, q, v, 2, scale=0.8)[0]
    assert not readout[..., ::2].any()  # the neighbours' denormal terms flushed: exactly zero
    torch.testing.assert_close(readout[..., 1::2], v[..., 1::2])
    tiny = torch.full((1 << 20,), 1e-40)
    assert (tiny * 1.0).min().item() > 0  # denormals survive in PyTorch's own ops afterwards


def test_env_forces_plain_fallback(monkeypatch):
    q, k, v = (t.requires_grad_() for t in _inputs(1, 4, 3, 6, 7))
    monkeypatch.setenv("LMRC_LOCAL_WINDOW", "plain")
    read, sim, aff = lw.local_attention(q, k, v, 1, 1, 0.5)
    assert not _is_native(read) and not _is_native(lw.local_similarity(q, k, 1))
    sim_plain = lw.local_similarity_plain(q, k, 1, 1, 0.5)
    assert torch.equal(sim, sim_plain)
    # the fallback is differentiated by autograd
    read.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_missing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("LMRC_CACHE_DIR", str(tmp_path / "cache"))
    _native.reset()
    try:
        q, k, v = _inputs(1, 4, 3, 5, 6)
        with pytest.warns(RuntimeWarning, match="no C compiler"):
            read, _, _ = lw.local_attention(q, k, v, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second call must not warn again
            lw.local_weighted_sum(torch.rand(1, 9, 5, 6), v, 1)
        expected = lw.local_weighted_sum_plain(torch.softmax(lw.local_similarity_plain(q, k, 1), 1), v, 1)
        assert torch.equal(read, expected)
        monkeypatch.setenv("LMRC_LOCAL_WINDOW", "native")
        with pytest.raises(RuntimeError, match="could not be built"):
            lw.local_similarity(q, k, 1)
    finally:
        _native.reset()


def test_build_goes_to_cache_dir_atomically(native, monkeypatch, tmp_path):
    monkeypatch.setenv("LMRC_CACHE_DIR", str(tmp_path))
    _native.reset()
    try:
        lib = _native.load(torch.float32)
        assert lib is not None and lib.path.parent == tmp_path
        assert [p.name for p in tmp_path.iterdir()] == [lib.path.name]  # no temporary left behind
    finally:
        _native.reset()


def test_non_cpu_tensors_use_plain_path():
    q, k, v = (torch.empty(1, 4, 6, 7, device="meta") for _ in range(3))
    read, sim, aff = lw.local_attention(q, k, v, 2)
    assert read.shape == (1, 4, 6, 7) and sim.shape == aff.shape == (1, 25, 6, 7)


def test_bad_arguments_raise():
    q, k, v = _inputs(1, 4, 3, 5, 6)
    with pytest.raises(ValueError, match="channels"):
        lw.local_weighted_sum(torch.rand(1, 8, 5, 6), v, 1)
    with pytest.raises(ValueError, match="radius"):
        lw.local_similarity(q, k, -1)
    with pytest.raises(ValueError, match="differ"):
        lw.local_attention(q, k[..., :5], v, 1)


# --- inference kernels (no autograd) --------------------------------------------------------------------------------

# widths below, at and above the vector width (8 or 16 floats, 4 or 8 doubles), so the per-pixel path, the vector
# blocks with their border shuffles and overlapping last block, and interior blocks (5 x 5 windows in one pass)
# are exercised
INFERENCE_SIZES = [(1, 13), (13, 1), (2, 3), (7, 9), (5, 17), (6, 30), (9, 4), (8, 52)]


@pytest.mark.parametrize("size,radius,dilation", list(itertools.product(INFERENCE_SIZES, [0, 1, 2, 3], [1, 2])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_attention_matches_dense_reference_and_topk(native, size, radius, dilation, dtype):
    h, w = size
    q, k, v = _inputs(2, 7, 11, h, w, dtype=dtype, seed=h * 100 + w)  # 11 value channels: 8 + a remainder of 3
    scale = 0.7
    with torch.no_grad():
        read, aff, top, none = lw.local_attention_inference(q, k, v, radius, dilation, scale, top_k=5, affinity=True)
        read_ref, sim_ref, aff_ref = local_memory_read_reference(q.double(), k.double(), v.double(), radius, scale, dilation)
        assert read.dtype == aff.dtype == top.dtype == dtype and none is None
        assert _max_diff(read, read_ref) <= TOL
        assert _max_diff(window_to_4d(aff, radius, dilation).reshape(2, h * w, h * w), aff_ref) <= TOL
        # top-k: the k largest of the window's similarities, descending, -inf where fewer are inside the image
        sim = lw.local_similarity_plain(q.double(), k.double(), radius, dilation, scale)
        expected = sim.topk(min(5, sim.shape[1]), dim=1).values
        assert top.shape == expected.shape
        assert _max_diff(top, expected) <= TOL
        # without the optional outputs, the same readout
        alone, no_aff, no_top, _ = lw.local_attention_inference(q, k, v, radius, dilation, scale)
        assert no_aff is None and no_top is None and torch.equal(alone, read)


@pytest.mark.parametrize("size,radius,dilation", list(itertools.product(INFERENCE_SIZES, [1, 2], [1, 2])))
def test_inference_weighted_sums_match_the_autograd_op(native, size, radius, dilation):
    h, w = size
    g = torch.Generator().manual_seed(h * 10 + w)
    # arbitrary (not softmax) weights: entries pointing outside the image must be ignored
    weights = torch.rand(2, (2 * radius + 1) ** 2, h, w, generator=g)
    a, b = torch.randn(2, 9, h, w, generator=g), torch.randn(2, 3, h, w, generator=g)
    with torch.no_grad():
        out_a, out_b = lw.local_weighted_sums_inference(weights, [a, b], radius, dilation)
        assert _max_diff(out_a, lw.local_weighted_sum_plain(weights, a, radius, dilation)) <= TOL
        assert _max_diff(out_b, lw.local_weighted_sum_plain(weights, b, radius, dilation)) <= TOL


@pytest.mark.parametrize("coarse,radius", [((3, 4), 1), ((4, 4), 2), ((2, 5), 2), ((3, 9), 2), ((5, 16), 1)])
def test_inference_slmr_reorganisation_reads_coarse_weights_as_eq6_7(native, coarse, radius):
    h, w = coarse
    g = torch.Generator().manual_seed(4)
    weights = torch.rand(2, (2 * radius + 1) ** 2, h, w, generator=g)
    key, value = torch.randn(2, 5, 2 * h, 2 * w, generator=g), torch.randn(2, 6, 2 * h, 2 * w, generator=g)
    with torch.no_grad():
        sk, sv = lw.local_weighted_sums_inference(weights, [key, value], radius, dilation=2, upsample=2)
    coarse_4d = window_to_4d(weights.double(), radius)
    assert _max_diff(sk, sequential_reorganise_reference(coarse_4d, key.double(), radius)) <= TOL
    assert _max_diff(sv, sequential_reorganise_reference(coarse_4d, value.double(), radius)) <= TOL
    with pytest.raises(ValueError, match="do not fit"):
        lw.local_weighted_sums_inference(weights, [key[..., :-1]], radius, dilation=2, upsample=2)


@pytest.mark.parametrize("size", [(4, 6), (6, 24), (4, 96)])  # per pixel, 8- and 16-float blocks (bf16 read as is)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_reads_take_one_channel_group_of_each_object_in_place(native, size, dtype):
    """A value B x N x C x H x W that is one channel group of a larger value (as a read takes it from the local
    memory) gives what its contiguous copy gives, in LMR and in SLMR's reorganisation."""
    h, w = size
    g = torch.Generator().manual_seed(h + w)
    q, k = (torch.randn(2, 6, h, w, generator=g).to(dtype) for _ in range(2))
    whole = torch.randn(2, 3, 2 * 9, h, w, generator=g).to(dtype)  # 3 objects, 2 groups of 9 channels
    group = whole[:, :, 9:]
    assert group.stride()[2:] == (h * w, w, 1) and not group.is_contiguous()
    copy = group.flatten(1, 2).contiguous()
    weights = torch.softmax(torch.randn(2, 25, h // 2, w // 2, generator=g), 1)
    with torch.no_grad():
        read, aff, top, _ = lw.local_attention_inference(q, k, group, 2, 1, 0.5, top_k=3, affinity=True)
        wanted = lw.local_attention_inference(q, k, copy, 2, 1, 0.5, top_k=3, affinity=True)
        assert torch.equal(read, wanted[0]) and torch.equal(aff, wanted[1]) and torch.equal(top, wanted[2])
        sk, sv = lw.local_weighted_sums_inference(weights, [k, group], 2, dilation=2, upsample=2)
        wk, wv = lw.local_weighted_sums_inference(weights, [k, copy], 2, dilation=2, upsample=2)
        assert sv.shape == group.shape and torch.equal(sk, wk) and torch.equal(sv.flatten(1, 2), wv)
        reference = sequential_reorganise_reference(window_to_4d(weights.double(), 2), copy.double(), 2)
        assert _max_diff(sv.flatten(1, 2), reference) <= (TOL if dtype == torch.float32 else 1e-2)
    with pytest.raises(ValueError, match="B x C x H x W"):  # the autograd op takes folded values only
        lw.local_attention(q, k, group, 2)


def _channels_last_group(objects, per_object, h, w, dtype, seed):
    """One channel group (the second of two) of a channels-last B*N x 2C x H x W tensor, as B x N x C x H x W."""
    g = torch.Generator().manual_seed(seed)
    whole = torch.randn(objects, 2 * per_object, h, w, generator=g).to(dtype).contiguous(
        memory_format=torch.channels_last)
    return whole.view(1, objects, 2 * per_object, h, w)[:, :, per_object:]


@pytest.mark.parametrize("isa", _native.supported_isas())
@pytest.mark.parametrize("size", [(3, 5), (6, 24), (5, 40)])  # narrower than the window, border and interior pixels
@pytest.mark.parametrize("per_object", [16, 32])  # bf16 widened per vector, or split into even / odd channel pairs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_channels_last_values_are_read_in_place_and_added_into_a_channels_last_sum(native, monkeypatch, isa, size,
                                                                                   per_object, dtype):
    """A channels-last value (the value encoder's output, one readout's channel group of it) is read in place; the
    weighed readout is added into a channels-last sum (the decoder's), whose ReLU comes out of the same pass in bf16
    rounded as PyTorch rounds; against eq. (4)-(5) and (6)-(7) literally."""
    from lmrc.model.comparator import ReliabilityWeight

    monkeypatch.setenv("LMRC_LOCAL_WINDOW_ISA", isa)
    h, w = size
    objects = 2
    value = _channels_last_group(objects, per_object, h, w, dtype, seed=h + w)
    assert lw._object_layout(value)[4] == 2 * per_object  # read in place, pixel stride 2 C
    real = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, _ = _inputs(1, 8, 1, h, w, dtype=real, seed=w)
    dense = value.to(torch.float64).flatten(1, 2).contiguous()
    read_ref, _, _ = local_memory_read_reference(q.double(), k.double(), dense, 2, 0.5)
    torch.manual_seed(0)
    module = ReliabilityWeight(3, alpha=1.5).to(real).requires_grad_(False)
    global_top = torch.randn(1, 3, h, w, dtype=real).sort(1, descending=True).values
    reliability = (global_top, module.conv.weight.reshape(-1), float(module.conv.bias), module.alpha)
    total = torch.randn(objects, per_object, h, w, dtype=real).contiguous(memory_format=torch.channels_last)
    before = total.clone()
    activated = torch.empty_like(total, dtype=torch.bfloat16 if real == torch.float32 else real)
    with torch.no_grad():
        alone, _, top, _ = lw.local_attention_inference(q, k, value, 2, 1, 0.5, top_k=3)
        assert alone.is_contiguous(memory_format=torch.channels_last) and alone.shape == (1, objects * per_object, h, w)
        assert _max_diff(alone, read_ref) <= TOL
        weight = module(top, global_top)
        got = lw.local_attention_inference(q, k, value, 2, 1, 0.5, top_k=3, reliability=reliability,
                                           out=total.view(1, objects, per_object, h, w), accumulate=True,
                                           relu_out=activated.view(1, objects, per_object, h, w))
    assert got[0].data_ptr() == total.data_ptr()
    expected = before.double() + (read_ref * weight.double()).view(objects, per_object, h, w)
    assert _max_diff(total, expected) <= TOL
    assert torch.equal(activated, torch.relu(total).to(activated.dtype))
    # SLMR's reorganisation of the value (eq. 6-7) from half-size weights: channels-last in, channels-last out
    if h % 2 == 0 and w % 2 == 0:
        g = torch.Generator().manual_seed(7)
        weights = torch.softmax(torch.randn(1, 25, h // 2, w // 2, generator=g, dtype=real), 1)
        with torch.no_grad():
            sk, sv = lw.local_weighted_sums_inference(weights, [k, value], 2, dilation=2, upsample=2)
        assert sv.shape == value.shape and sv.stride(2) == 1
        reference = sequential_reorganise_reference(window_to_4d(weights.double(), 2), dense, 2)
        assert _max_diff(sv.flatten(1, 2), reference) <= TOL


def test_channels_last_reads_fall_back_where_the_kernel_cannot_write(native, monkeypatch):
    """Channel counts the channels-last kernel does not take (not a multiple of 16), an NCHW value with a
    channels-last `out`, and the plain path: the same sums, `out` filled afterwards."""
    h, w = 6, 20
    q, k, _ = _inputs(1, 8, 1, h, w, seed=3)
    for value in (_channels_last_group(2, 9, h, w, torch.float32, 1),  # 9 channels: copied to NCHW
                  _channels_last_group(2, 16, h, w, torch.float32, 2).contiguous()):  # NCHW value
        per_object = value.shape[2]
        read_ref, _, _ = local_memory_read_reference(q.double(), k.double(), value.double().flatten(1, 2), 2, 0.5)
        for backend in ("auto", "plain"):
            monkeypatch.setenv("LMRC_LOCAL_WINDOW", backend)
            total = torch.ones(2, per_object, h, w).contiguous(memory_format=torch.channels_last)
            activated = torch.empty(2, per_object, h, w, dtype=torch.bfloat16)  # NCHW: not the sum's layout
            with torch.no_grad():
                got = lw.local_attention_inference(q, k, value, 2, 1, 0.5, out=total.view(1, 2, per_object, h, w),
                                                   accumulate=True, relu_out=activated.view(1, 2, per_object, h, w))
            assert got[0].data_ptr() == total.data_ptr()
            assert _max_diff(total, 1 + read_ref.view(2, per_object, h, w)) <= TOL
            assert torch.equal(activated, torch.relu(total).bfloat16())
    with pytest.raises(ValueError, match="need out"):
        lw.local_attention_inference(q, k, value, 2, 1, 0.5, accumulate=True)


def test_inference_ops_take_the_autograd_path_when_gradients_are_needed(native):
    q, k, v = _inputs(1, 4, 3, 6, 10)
    q.requires_grad_()
    read, aff, top, _ = lw.local_attention_inference(q, k, v, 2, 1, 0.5, top_k=3, affinity=True)
    assert _is_native(read)  # the autograd Function, so training still differentiates through it
    read.sum().backward()
    assert q.grad is not None
    weights = torch.rand(1, 25, 3, 5, requires_grad=True)
    (sv,) = lw.local_weighted_sums_inference(weights, [v], 2, 2, upsample=2)
    assert sv.grad_fn is not None
    with torch.no_grad():
        fast = lw.local_attention_inference(q, k, v, 2, 1, 0.5, top_k=3, affinity=True)[:3]
    for a, b in zip(fast, (read, aff, top)):
        assert _max_diff(a, b.detach()) <= TOL


def test_inference_results_do_not_depend_on_the_thread_count(native):
    q, k, v = _inputs(2, 16, 20, 37, 29)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.no_grad():
                results.append(lw.local_attention_inference(q, k, v, 2, 1, 0.5, top_k=5, affinity=True)[:3])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)  # rows are independent: bitwise equal whatever the split into bands


@pytest.mark.parametrize("size,radius", [((7, 9), 1), ((6, 30), 2), ((13, 1), 2), ((5, 17), 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inference_attention_applies_the_comparator_weight_and_writes_into_a_slice(native, size, radius, dtype):
    from lmrc.model.comparator import ReliabilityWeight

    h, w = size
    objects, per_object = 2, 5
    q, k, v = _inputs(1, 6, objects * per_object, h, w, dtype=dtype, seed=11)
    top_k = min(3, (2 * radius + 1) ** 2)
    torch.manual_seed(0)
    module = ReliabilityWeight(top_k, alpha=1.5).to(dtype)
    global_top = torch.randn(1, top_k, h, w, dtype=dtype).sort(1, descending=True).values
    with torch.no_grad():
        read, _, top, none = lw.local_attention_inference(q, k, v, radius, 1, 0.5, top_k=top_k)
        expected_weight = module(top, global_top)  # the comparator's own eq. (9) + 1x1 conv + sigmoid
        # the readout's place in a decoder input of 7 channels per object (another readout's 2 before it)
        buffer = torch.full((1, objects, 7, h, w), 5.0, dtype=dtype)
        slot = buffer[:, :, 2:]
        fused = lw.local_attention_inference(q, k, v, radius, 1, 0.5, top_k=top_k, out=slot,
                                             reliability=(global_top, module.conv.weight.reshape(-1),
                                                          float(module.conv.bias), module.alpha))
    assert none is None and fused[0] is slot
    assert _max_diff(fused[3], expected_weight) <= TOL
    assert _max_diff(slot, (read * expected_weight).view(1, objects, per_object, h, w)) <= TOL
    assert torch.equal(buffer[:, :, :2], torch.full_like(buffer[:, :, :2], 5.0))  # nothing written outside the slot
    assert torch.equal(fused[2], top)
    with pytest.raises(ValueError, match="reliability"):
        lw.local_attention_inference(q, k, v, radius, 1, 0.5, top_k=top_k + 1, reliability=(
            global_top, module.conv.weight.reshape(-1), 0.0, 1.0))


def test_workspace_buffers_are_reused_per_name_shape_and_dtype():
    from lmrc.utils.workspace import Workspace

    workspace = Workspace(slots=16)
    a = workspace.buffer("x", (2, 3), torch.float32)
    assert workspace.buffer("x", (2, 3), torch.float32) is a
    assert workspace.buffer("x", (2, 4), torch.float32) is not a and workspace.buffer("y", (2, 3), torch.float32) is not a
    assert workspace.buffer("x", (2, 3), torch.float64).dtype == torch.float64
    with torch.inference_mode():
        b = workspace.buffer("z", (4,), torch.float32)
    assert not b.is_inference()  # usable as an output outside inference mode too
    for i in range(20):  # a bounded number of buffers is kept
        workspace.buffer(f"n{i}", (1,), torch.float32)
    assert workspace.buffer("x", (2, 3), torch.float32) is not a
    workspace.clear()
    assert not workspace.buffers


# --- runtime dispatch: every ISA variant this CPU can run gives the reference's results ---------------------------


def test_isa_choice_follows_the_cpu_and_the_env(monkeypatch):
    supported = _native.supported_isas()
    assert supported[-1] == "generic" and supported[0] == _native.chosen_isa()
    if "avx512f" in _native.cpu_features() and "avx512bw" in _native.cpu_features():
        assert "avx512" in supported
    monkeypatch.setenv("LMRC_LOCAL_WINDOW_ISA", "generic")
    assert _native.chosen_isa() == "generic"
    monkeypatch.setenv("LMRC_LOCAL_WINDOW_ISA", "sse9")
    with pytest.raises(ValueError, match="LMRC_LOCAL_WINDOW_ISA"):
        _native.chosen_isa()
    missing = [name for name in _native.ISA_VARIANTS if name not in supported]
    if missing:
        monkeypatch.setenv("LMRC_LOCAL_WINDOW_ISA", missing[0])
        with pytest.raises(RuntimeError, match="lacks"):
            _native.chosen_isa()


@pytest.mark.parametrize("isa", _native.supported_isas())
def test_each_isa_variant_matches_the_reference(native, monkeypatch, isa):
    monkeypatch.setenv("LMRC_LOCAL_WINDOW_ISA", isa)
    lib = _native.load(torch.float32)
    assert lib.isa == isa and lib.vector_bytes == _native.ISA_VARIANTS[isa][1]
    # widths below, at and above 4, 8 and 16 floats: the per-pixel path, border shuffles and the last block
    for (h, w), dilation in [((5, 3), 1), ((6, 17), 1), ((7, 40), 2), ((4, 16), 1), ((7, 40), 1)]:
        q, k, v = _inputs(2, 9, 11, h, w, seed=w)
        scale = 0.6
        read_ref, sim_ref, aff_ref = local_memory_read_reference(q.double(), k.double(), v.double(), 2, scale, dilation)
        with torch.no_grad():
            read, aff, top, _ = lw.local_attention_inference(q, k, v, 2, dilation, scale, top_k=4, affinity=True)
            assert _max_diff(read, read_ref) <= TOL
            assert _max_diff(window_to_4d(aff, 2, dilation).reshape(2, h * w, h * w), aff_ref) <= TOL
            sim = lw.local_similarity_plain(q.double(), k.double(), 2, dilation, scale)
            assert _max_diff(top, sim.topk(4, dim=1).values) <= TOL
            weights = torch.rand(2, 25, h, w)
            (wsum,) = lw.local_weighted_sums_inference(weights, [v], 2, dilation)
            assert _max_diff(wsum, lw.local_weighted_sum_plain(weights.double(), v.double(), 2, dilation)) <= TOL
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        read_g, sim_g, _ = lw.local_attention(*leaves, 2, dilation, scale)
        assert _is_native(read_g) and _max_diff(read_g.detach(), read_ref) <= TOL
        assert _max_diff(sim_g.detach(), lw.local_similarity_plain(q, k, 2, dilation, scale)) <= TOL


@pytest.mark.parametrize("isa", _native.supported_isas())
def test_bf16_inputs_are_read_natively_by_the_inference_kernels(native, monkeypatch, isa):
    monkeypatch.setenv("LMRC_LOCAL_WINDOW_ISA", isa)
    assert _native.load(torch.float32).bf16_inputs
    q, k, v = _inputs(1, 16, 10, 4, 100, seed=3)  # wide enough (>= BF16_INPUTS_MIN_WIDTH) for the bf16 kernels
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    g = torch.Generator().manual_seed(5)
    weights = torch.rand(1, 25, 2, 50, generator=g)
    fine = [torch.randn(1, c, 4, 100, generator=g).bfloat16() for c in (16, 6)]
    calls = []
    lib = _native.load(torch.float32)
    original = type(lib).__call__
    monkeypatch.setattr(type(lib), "__call__", lambda self, name, *a: (calls.append(name), original(self, name, *a)))
    with torch.no_grad():
        read, aff, top, _ = lw.local_attention_inference(qb, kb, vb, 2, 1, 0.5, top_k=3, affinity=True)
        sk, sv = lw.local_weighted_sums_inference(weights, fine, 2, 2, upsample=2)
        # the same kernels on float32 copies of the bf16 values: the same arithmetic, bit for bit
        read32, aff32, top32, _ = lw.local_attention_inference(qb.float(), kb.float(), vb.float(), 2, 1, 0.5, top_k=3,
                                                               affinity=True)
        sk32, sv32 = lw.local_weighted_sums_inference(weights, [t.float() for t in fine], 2, 2, upsample=2)
    assert calls == ["lw_attention_inf_bf16", "lw_wsum_inf_bf16", "lw_attention_inf", "lw_wsum_inf"]
    for a, b in ((read, read32), (aff, aff32), (top, top32)):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.bfloat16())
    assert torch.equal(sk, sk32) and torch.equal(sv, sv32)  # float32 weights: float32 results
    # and against the float64 reference on the unrounded inputs: bf16 rounding of the inputs only
    read_ref, _, aff_ref = local_memory_read_reference(q.double(), k.double(), v.double(), 2, 0.5)
    assert (read.double() - read_ref).abs().max().item() <= 0.05 * read_ref.abs().max().item()
    assert _max_diff(window_to_4d(aff.float(), 2).reshape(1, 4 * 100, 4 * 100), aff_ref) <= 0.02
    # narrow images are copied to float32 (cheaper there than widening every load)
    calls.clear()
    with torch.no_grad():
        lw.local_attention_inference(qb[..., :40], kb[..., :40], vb[..., :40], 2, 1, 0.5)
    assert calls == ["lw_attention_inf"]


@pytest.mark.parametrize("isa", _native.supported_isas())
def test_wide_rows_take_the_blocked_autograd_kernels_and_match(native, monkeypatch, isa):
    """Rows at least a vector wide (16 floats / 8 doubles with AVX-512) run the blocked forward and backward."""
    monkeypatch.setenv("LMRC_LOCAL_WINDOW_ISA", isa)
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1, 2, 17, dtype=torch.float64, seed=9))
    assert torch.autograd.gradcheck(
        lambda a, b, c: tuple(_masked(t) for t in lw.local_attention(a, b, c, 2, 1, 0.6)), (q, k, v), fast_mode=True)
    assert torch.autograd.gradcheck(lambda a, b, c: lw.local_attention(a, b, c, 1, 2, 0.6)[0], (q, k, v))
    # float32 at model-like sizes against plain autograd
    q, k, v = _inputs(2, 16, 24, 7, 37)
    g = torch.Generator().manual_seed(1)
    g_read, g_sim, g_aff = (torch.randn(2, c, 7, 37, generator=g) for c in (24, 25, 25))

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        read, sim, aff = fn(*leaves)
        loss = (read * g_read).sum() + (_masked(sim) * g_sim).sum() + (aff * g_aff).sum()
        return (read, sim, aff), torch.autograd.grad(loss, leaves)

    def plain(a, b, c):
        sim = lw.local_similarity_plain(a, b, 2, 1, 0.5)
        aff = torch.softmax(sim, 1)
        return lw.local_weighted_sum_plain(aff, c, 2, 1), sim, aff

    (out_fast, grads_fast), (out_plain, grads_plain) = grads(lambda a, b, c: lw.local_attention(a, b, c, 2, 1, 0.5)), grads(plain)
    assert _is_native(out_fast[0])
    for fast, ref in zip(out_fast, out_plain):
        assert _max_diff(fast.detach(), ref.detach()) <= TOL
    for fast, ref in zip(grads_fast, grads_plain):
        assert (fast - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_narrow_rows_take_8_float_vectors_where_avx512_was_chosen_automatically(native, monkeypatch):
    monkeypatch.delenv("LMRC_LOCAL_WINDOW_ISA", raising=False)
    wide = _native.load_for_width(torch.float32, 200)
    assert wide.isa == _native.chosen_isa()
    narrow = _native.load_for_width(torch.float32, 24)
    assert _native.load_for_width(torch.float32, _native.NARROW_ROW) is wide
    if _native.chosen_isa() == "avx512":
        assert narrow.isa == "avx512_256" and narrow.vector_bytes == 32
        monkeypatch.setenv("LMRC_LOCAL_WINDOW_ISA", "avx512")  # forced: kept
        assert _native.load_for_width(torch.float32, 24).isa == "avx512"
    else:
        assert narrow is wide
