"""Local-window similarity and weighted sums: the kernels behind LMR (eq. 4-5) and SLMR (eq. 6-8).

Offsets o = (dy, dx) with dy, dx in [-d, d] are ordered row-major (dy outer, dx inner), so a window
tensor has (2d+1)^2 channels. A neighbour x + dilation * o outside the image never receives weight.

The public functions run compiled C kernels (`local_window.c`, built at first use, see `_native`) on CPU
tensors, and the plain PyTorch versions below on other devices, without a C compiler, or when
`LMRC_LOCAL_WINDOW=plain`.
"""
from __future__ import annotations

import ctypes
import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lmrc.ops import _native


def _count_macs(pixels_times_window: int, channels: int) -> None:
    """The nominal multiply-adds of a local-window op (forward only, whichever path runs it): similarity
    B H W (2d+1)^2 C, weighted sum B H W (2d+1)^2 C, attention B H W (2d+1)^2 (Ck + Cv) (`_native.count_multiply_adds`)."""
    _native.count_macs("local_window", float(pixels_times_window) * channels)


def window_offsets(radius: int) -> list[tuple[int, int]]:
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]


def _shifted(x: Tensor, dy: int, dx: int, pad: int) -> Tensor:
    # x already padded by `pad` on every side; view of x(p + (dy, dx)) for every p of the unpadded image.
    h, w = x.shape[-2] - 2 * pad, x.shape[-1] - 2 * pad
    return x[..., pad + dy: pad + dy + h, pad + dx: pad + dx + w]


def local_similarity_plain(query: Tensor, key: Tensor, radius: int, dilation: int = 1, scale: float = 1.0) -> Tensor:
    """-scale * ||q(x) - k(x + dilation*o)||^2 for every offset o, -inf where x + dilation*o is outside.

    query, key: B x C x H x W. Returns B x (2d+1)^2 x H x W. Plain PyTorch over shifted views.
    """
    pad = radius * dilation
    key_p = F.pad(key, (pad, pad, pad, pad))
    valid_p = F.pad(torch.ones_like(key[:, :1]), (pad, pad, pad, pad))
    q_sq = query.pow(2).sum(1)
    k_sq = key_p.pow(2).sum(1, keepdim=True)
    out = []
    for dy, dx in window_offsets(radius):
        k = _shifted(key_p, dy * dilation, dx * dilation, pad)
        dot = (query * k).sum(1)
        sim = -(q_sq - 2 * dot + _shifted(k_sq, dy * dilation, dx * dilation, pad)[:, 0]) * scale
        valid = _shifted(valid_p, dy * dilation, dx * dilation, pad)[:, 0] > 0
        out.append(sim.masked_fill(~valid, float("-inf")))
    return torch.stack(out, 1)


def local_weighted_sum_plain(weights: Tensor, value: Tensor, radius: int, dilation: int = 1) -> Tensor:
    """sum_o w_o(x) * v(x + dilation*o); outside neighbours contribute nothing.

    weights: B x (2d+1)^2 x H x W, value: B x C x H x W. Returns B x C x H x W.
    """
    pad = radius * dilation
    value_p = F.pad(value, (pad, pad, pad, pad))
    out = torch.zeros_like(value)
    for index, (dy, dx) in enumerate(window_offsets(radius)):
        out = out + weights[:, index: index + 1] * _shifted(value_p, dy * dilation, dx * dilation, pad)
    return out


def _window_size(radius: int) -> int:
    return (2 * radius + 1) ** 2


def _check(radius: int, dilation: int, *pairs: tuple[str, Tensor], grouped: tuple[str, ...] = ()) -> None:
    """Tensors named in `grouped` may also be B x N x C x H x W (objects' channel groups, folded to N * C)."""
    if int(radius) != radius or radius < 0:
        raise ValueError(f"radius must be a non-negative integer, got {radius!r}")
    if int(dilation) != dilation or dilation < 1:
        raise ValueError(f"dilation must be a positive integer, got {dilation!r}")
    ref_name, ref = pairs[0]
    for name, t in pairs:
        if t.dim() != 4 and not (t.dim() == 5 and name in grouped):
            raise ValueError(f"{name} must be B x C x H x W, got shape {tuple(t.shape)}")
        if (t.shape[0], *t.shape[-2:]) != (ref.shape[0], *ref.shape[-2:]):
            raise ValueError(f"{name} {tuple(t.shape)} and {ref_name} {tuple(ref.shape)} differ in batch or size")


_MAX_NATIVE_RADIUS = 7  # LW_MAX_RADIUS in local_window.c


def _native_for(radius: int, *tensors: Tensor):
    """The native library to use for these inputs, or None for the plain PyTorch path.

    `LMRC_LOCAL_WINDOW=plain` forces the plain path, `=native` makes an unavailable native path an error,
    `auto` (default) uses native kernels for CPU tensors when a C compiler is available.
    """
    mode = os.environ.get("LMRC_LOCAL_WINDOW", "auto").strip().lower() or "auto"
    if mode not in ("auto", "plain", "native"):
        raise ValueError(f"LMRC_LOCAL_WINDOW must be auto, plain or native, got {mode!r}")
    if mode == "plain" or radius > _MAX_NATIVE_RADIUS or any(t.numel() == 0 for t in tensors):
        return None
    if any(t.device.type != "cpu" or not t.is_floating_point() for t in tensors):
        if mode == "native":
            raise RuntimeError("LMRC_LOCAL_WINDOW=native needs floating-point CPU tensors")
        return None
    lib = _native.load_for_width(_compute_dtype(*tensors), max(t.shape[-1] for t in tensors))
    if lib is None and mode == "native":
        raise RuntimeError("LMRC_LOCAL_WINDOW=native but the native kernels could not be built (see the warning)")
    return lib


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # bf16 / fp16 are computed in fp32; float64 keeps float64 (gradcheck runs the same C code in double).
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _result_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _prep(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


BF16_INPUTS_MIN_WIDTH = 96  # narrower bf16 images are copied to float32 (below)


def _bf16_inputs(lib, *tensors: Tensor) -> bool:
    """True when the inference kernels read these tensors as bfloat16 (all bf16, and the library has the variant).
    Narrow images are copied to float32 instead: their data stays in cache, and widening every load costs more
    than one copy (benchmarks/local_read.py: x0.7 at 1/16 of 480p, x1.1-1.3 at 1/8 and 1/4)."""
    return (getattr(lib, "bf16_inputs", False) and all(t.dtype == torch.bfloat16 for t in tensors)
            and max(t.shape[-1] for t in tensors) >= BF16_INPUTS_MIN_WIDTH)


NHWC_CHANNEL_MULTIPLE = 16  # channels-last reads vectorise each object's channels: a multiple of every vector width


def _object_layout(t: Tensor) -> tuple[int, int, int, int, int] | None:
    """(channels, batch stride, object stride, channels per object, pixel stride) of what the inference kernels read
    or write in place, or None for any other layout. NCHW (pixel stride 0): B x C x H x W contiguous, or
    B x N x C x H x W with each object's C x H x W block contiguous (one channel group of a larger tensor, N C
    channels). Channels-last: B x C x H x W channels-last, or B x N x C x H x W whose objects' C channels are
    contiguous at every pixel (one channel group of a channels-last B*N x C' x H x W tensor), C a multiple of
    NHWC_CHANNEL_MULTIPLE."""
    h, w = t.shape[-2:]
    if t.dim() == 4 and t.is_contiguous():
        return t.shape[1], t.shape[1] * h * w, t.shape[1] * h * w, max(1, t.shape[1]), 0
    if t.dim() == 5 and t.stride()[2:] == (h * w, w, 1):
        return t.shape[1] * t.shape[2], t.stride(0), t.stride(1), max(1, t.shape[2]), 0
    c = t.shape[-3]
    if c == 0 or c % NHWC_CHANNEL_MULTIPLE or t.dim() not in (4, 5) or t.stride(-3) != 1:
        return None
    pixel = t.stride(-1)
    if pixel < c or t.stride(-2) != w * pixel:
        return None
    if t.dim() == 4:
        return c, t.stride(0), 0, c, pixel
    return t.shape[1] * c, t.stride(0), t.stride(1), c, pixel


def _grouped_value(value: Tensor, dtype: torch.dtype, bf16: bool,
                   lib=None) -> tuple[Tensor, int, tuple[int, int, int, int], int]:
    """A value for the inference kernels (see `_object_layout`), its channels, its layout and whether the kernel
    reads it as bfloat16. Channels-last values are read in place in float or (where the library has bf16 inputs)
    bf16; NCHW ones in the kernel's input type (bf16 when `bf16`); any other layout or type is copied first."""
    layout = _object_layout(value)
    if layout is not None and layout[4] and (value.dtype == dtype or (
            value.dtype == torch.bfloat16 and getattr(lib, "bf16_inputs", False))):
        return value, layout[0], layout[1:], int(value.dtype == torch.bfloat16)
    v = value if (bf16 and value.dtype == torch.bfloat16) or value.dtype == dtype else value.to(dtype)
    layout = _object_layout(v)
    if layout is not None and layout[4] and v.dtype == dtype:
        return v, layout[0], layout[1:], 0
    if layout is None or layout[4]:
        v = (v.flatten(1, 2) if v.dim() == 5 else v).contiguous()
        layout = _object_layout(v)
    return v, layout[0], layout[1:], 0


def _ptr(t: Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


class _NativeSimilarity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, radius, dilation, scale, lib):
        dtype = _compute_dtype(query, key)
        q, k = _prep(query, dtype), _prep(key, dtype)
        b, c, h, w = q.shape
        sim = torch.empty(b, _window_size(radius), h, w, dtype=dtype)
        lib("lw_similarity_fwd", _ptr(q), _ptr(k), _ptr(sim), b, c, h, w, radius, dilation, float(scale))
        # keep the caller's tensors (not fp32 copies of bf16 inputs): backward recasts them
        ctx.save_for_backward(query, key)
        ctx.params = (radius, dilation, float(scale), lib, dtype)
        return sim.to(_result_dtype(query, key))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sim):
        query, key = ctx.saved_tensors
        radius, dilation, scale, lib, dtype = ctx.params
        q, k, gs = _prep(query, dtype), _prep(key, dtype), _prep(grad_sim, dtype)
        gq = torch.empty_like(q) if ctx.needs_input_grad[0] else None
        gk = torch.empty_like(k) if ctx.needs_input_grad[1] else None
        b, c, h, w = q.shape
        lib("lw_similarity_bwd", _ptr(gs), _ptr(q), _ptr(k), _ptr(gq), _ptr(gk), b, c, h, w, radius, dilation, scale)
        return (
            None if gq is None else gq.to(query.dtype),
            None if gk is None else gk.to(key.dtype),
            None, None, None, None,
        )


class _NativeWeightedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights, value, radius, dilation, lib):
        dtype = _compute_dtype(weights, value)
        wt, v = _prep(weights, dtype), _prep(value, dtype)
        b, c, h, w = v.shape
        out = torch.empty_like(v)
        lib("lw_wsum_fwd", _ptr(wt), _ptr(v), _ptr(out), b, c, h, w, radius, dilation)
        ctx.save_for_backward(weights, value)
        ctx.params = (radius, dilation, lib, dtype)
        return out.to(_result_dtype(weights, value))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        weights, value = ctx.saved_tensors
        radius, dilation, lib, dtype = ctx.params
        wt, v, go = _prep(weights, dtype), _prep(value, dtype), _prep(grad_out, dtype)
        gw = torch.empty_like(wt) if ctx.needs_input_grad[0] else None
        gv = torch.empty_like(v) if ctx.needs_input_grad[1] else None
        b, c, h, w = v.shape
        lib("lw_wsum_bwd", _ptr(go), _ptr(wt), _ptr(v), _ptr(gw), _ptr(gv), b, c, h, w, radius, dilation)
        return (
            None if gw is None else gw.to(weights.dtype),
            None if gv is None else gv.to(value.dtype),
            None, None, None,
        )


class _NativeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, radius, dilation, scale, lib):
        ctx.set_materialize_grads(False)  # unused outputs (often the similarity) get no gradient buffer
        dtype = _compute_dtype(query, key, value)
        q, k, v = _prep(query, dtype), _prep(key, dtype), _prep(value, dtype)
        b, ck, h, w = q.shape
        cv = v.shape[1]
        sim = torch.empty(b, _window_size(radius), h, w, dtype=dtype)
        aff = torch.empty_like(sim)
        readout = torch.empty_like(v)
        lib("lw_attention_fwd", _ptr(q), _ptr(k), _ptr(v), _ptr(sim), _ptr(aff), _ptr(readout),
            b, ck, cv, h, w, radius, dilation, float(scale))
        # backward needs the inputs and the affinity only; the similarity is not kept
        ctx.save_for_backward(query, key, value, aff)
        ctx.params = (radius, dilation, float(scale), lib, dtype)
        out_dtype = _result_dtype(query, key, value)
        return readout.to(out_dtype), sim.to(out_dtype), aff.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_readout, grad_sim, grad_aff):
        query, key, value, aff = ctx.saved_tensors
        radius, dilation, scale, lib, dtype = ctx.params
        q, k, v = _prep(query, dtype), _prep(key, dtype), _prep(value, dtype)
        gr = torch.zeros_like(v) if grad_readout is None else _prep(grad_readout, dtype)
        gs, ga = _prep(grad_sim, dtype), _prep(grad_aff, dtype)
        b, ck, h, w = q.shape
        cv = v.shape[1]
        dsim = torch.empty_like(aff)
        gq = torch.empty_like(q)  # always allocated: the kernel uses its rows as scratch
        gk = torch.empty_like(k) if ctx.needs_input_grad[1] else None
        gv = torch.empty_like(v) if ctx.needs_input_grad[2] else None
        lib("lw_attention_bwd", _ptr(gr), _ptr(gs), _ptr(ga), _ptr(q), _ptr(k), _ptr(v), _ptr(aff), _ptr(dsim),
            _ptr(gq), _ptr(gk), _ptr(gv), b, ck, cv, h, w, radius, dilation, scale)
        return (
            gq.to(query.dtype) if ctx.needs_input_grad[0] else None,
            None if gk is None else gk.to(key.dtype),
            None if gv is None else gv.to(value.dtype),
            None, None, None, None,
        )


def local_similarity(query: Tensor, key: Tensor, radius: int, dilation: int = 1, scale: float = 1.0) -> Tensor:
    """LMR similarity (eq. 4) in a window: B x C x H x W pair -> B x (2d+1)^2 x H x W, -inf outside the image."""
    _check(radius, dilation, ("query", query), ("key", key))
    if query.shape[1] != key.shape[1]:
        raise ValueError(f"query and key channels differ: {query.shape[1]} vs {key.shape[1]}")
    _count_macs(query.shape[0] * query.shape[2] * query.shape[3] * _window_size(radius), query.shape[1])
    lib = _native_for(radius, query, key)
    if lib is None:
        return local_similarity_plain(query, key, radius, dilation, scale)
    return _NativeSimilarity.apply(query, key, int(radius), int(dilation), scale, lib)


def local_weighted_sum(weights: Tensor, value: Tensor, radius: int, dilation: int = 1) -> Tensor:
    """Window-weighted sum (eq. 5, and eq. 6-7 with dilation 2): B x (2d+1)^2 x H x W, B x C x H x W -> B x C x H x W."""
    _check(radius, dilation, ("value", value), ("weights", weights))
    if weights.shape[1] != _window_size(radius):
        raise ValueError(f"weights need {_window_size(radius)} channels for radius {radius}, got {weights.shape[1]}")
    _count_macs(value.shape[0] * value.shape[2] * value.shape[3] * _window_size(radius), value.shape[1])
    lib = _native_for(radius, weights, value)
    if lib is None:
        return local_weighted_sum_plain(weights, value, radius, dilation)
    return _NativeWeightedSum.apply(weights, value, int(radius), int(dilation), lib)


def local_attention(
    query: Tensor, key: Tensor, value: Tensor, radius: int, dilation: int = 1, scale: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """LMR (eq. 4-5): returns (readout B x Cv x H x W, similarity and affinity B x (2d+1)^2 x H x W)."""
    _check(radius, dilation, ("query", query), ("key", key), ("value", value))
    if query.shape[1] != key.shape[1]:
        raise ValueError(f"query and key channels differ: {query.shape[1]} vs {key.shape[1]}")
    _count_macs(query.shape[0] * query.shape[2] * query.shape[3] * _window_size(radius), query.shape[1] + value.shape[1])
    lib = _native_for(radius, query, key, value)
    if lib is None:
        sim = local_similarity_plain(query, key, radius, dilation, scale)
        aff = torch.softmax(sim, dim=1)
        return local_weighted_sum_plain(aff, value, radius, dilation), sim, aff
    readout, sim, aff = _NativeAttention.apply(query, key, value, int(radius), int(dilation), scale, lib)
    return readout, sim, aff


# --- inference (no autograd) ---------------------------------------------------------------------------------------

_MAX_NATIVE_TOP_K = 16  # LW_MAX_TOPK in local_window.c


def _output(out: Tensor | None, like_shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    # the caller's buffer when the kernel can write it directly, else a new tensor
    if out is not None and tuple(out.shape) == tuple(like_shape) and out.dtype == dtype and out.is_contiguous():
        return out
    return torch.empty(like_shape, dtype=dtype)


def needs_grad(*tensors: Tensor) -> bool:
    """True when autograd would record an op on these tensors (the inference functions then take the autograd path)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def local_attention_inference(
    query: Tensor, key: Tensor, value: Tensor, radius: int, dilation: int = 1, scale: float = 1.0, *,
    top_k: int = 0, affinity: bool = False, out: Tensor | None = None,
    reliability: tuple[Tensor, Tensor, float, float] | None = None, accumulate: bool = False,
    relu_out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """LMR (eq. 4-5) for inference: (readout, affinity or None, top-k similarities or None, reliability weight or None).

    The same results as `local_attention` (up to float rounding), from one native kernel that writes neither the
    similarity nor, unless `affinity`, the affinity: top_k > 0 returns the min(top_k, (2d+1)^2) largest
    similarities of each pixel in descending order (B x k x H x W, as `torch.topk` along the window), computed in
    the same pass. Inputs that need gradients (or no native kernels) take `local_attention`'s path instead.

    reliability = (global top-k B x k x H x W, 1x1 conv weights (k,), bias, alpha), with k = top_k <= (2d+1)^2:
    the memory comparator's weight H = sigmoid(bias + sum_j w_j SCB_j) of eq. (9) from this read's top-k and the
    global one; the readout comes back multiplied by H (eq. 10) and H (B x 1 x H x W) as the fourth result. Without
    native kernels the fourth result is None and the readout is not weighed, nor written into `out`: the caller
    applies the comparator.

    value: B x Cv x H x W, or B x N x C x H x W (Cv = N C) in a layout the kernel reads in place: each object's
    C x H x W block contiguous (e.g. one channel group of the local memory's value), or channels-last (each
    object's C channels contiguous at every pixel, C a multiple of 16, float or bf16: the value encoder's
    channels-last output). The readout has the value's layout class (channels-last: B x Cv x H x W channels-last).
    out: where to write the readout, a tensor of the readout's shape (or B x N x C x H x W) in that layout class
    (e.g. the readout's channel slice of a larger buffer, or for a channels-last value the decoder's channels-last
    B*N x C x H x W sum viewed as B x N x C x H x W); the readout returned is then `out`. accumulate: add the
    readout into `out` instead. relu_out (out's shape, bf16 or float): receives relu(out) afterwards, in the same
    pass where the kernel writes `out` channels-last and relu_out has out's strides. An `out` the kernel cannot
    write is filled afterwards.
    """
    _check(radius, dilation, ("query", query), ("key", key), ("value", value), grouped=("value",))
    if query.shape[1] != key.shape[1]:
        raise ValueError(f"query and key channels differ: {query.shape[1]} vs {key.shape[1]}")
    if (accumulate or relu_out is not None) and out is None:
        raise ValueError("accumulate and relu_out need out")
    k = min(int(top_k), _window_size(radius))
    if reliability is not None and (k != top_k or reliability[1].numel() != k or reliability[0].shape[1] != k):
        raise ValueError(f"reliability needs top_k <= {_window_size(radius)} window positions and k weights and "
                         f"global similarities, got top_k={top_k}, {reliability[1].numel()} and {reliability[0].shape[1]}")
    lib = None
    if not needs_grad(query, key, value, *(reliability[:2] if reliability else ())) and k <= _MAX_NATIVE_TOP_K:
        lib = _native_for(radius, query, key, value)
    if lib is None:
        readout, sim, aff = local_attention(query, key, value.flatten(1, 2) if value.dim() == 5 else value, radius,
                                            dilation, scale)
        top = sim.topk(k, dim=1).values if k > 0 else None
        if out is not None and reliability is None:  # a readout still to be weighed is not put into `out`
            readout = _store(out, readout, accumulate, relu_out)
        return readout, aff if affinity else None, top, None  # not weighed: the caller applies the comparator
    dtype = _compute_dtype(query, key, value)
    # bf16 inputs (bf16 autocast) are read as they are, without float32 copies; all else computes in `dtype`
    bf16 = _bf16_inputs(lib, query, key, value)
    q, kk = (t.contiguous() if bf16 else _prep(t, dtype) for t in (query, key))
    v, cv, value_layout, value_bf16 = _grouped_value(value, dtype, bf16, lib)
    nhwc = value_layout[3] > 0
    b, ck, h, w = q.shape
    _count_macs(b * h * w * _window_size(radius), ck + cv)
    layout = _out_layout(out, b, cv, h, w, dtype, nhwc)
    direct = layout is not None
    if layout is None:
        fresh = (torch.empty(b, h, w, cv, dtype=dtype).permute(0, 3, 1, 2) if nhwc
                 else torch.empty(b, cv, h, w, dtype=dtype))
        layout = (fresh, *_object_layout(fresh)[1:])
    readout = layout[0]
    act = relu_out if direct and nhwc and _same_layout(relu_out, readout) else None
    aff = torch.empty(b, _window_size(radius), h, w, dtype=dtype) if affinity else None
    top = torch.empty(b, k, h, w, dtype=dtype) if k > 0 else None
    gtop = relw = weight = None
    bias = alpha = 0.0
    if reliability is not None:
        gtop, relw = _prep(reliability[0], dtype), _prep(reliability[1].reshape(-1), dtype)
        bias, alpha = float(reliability[2]), float(reliability[3])
        weight = torch.empty(b, 1, h, w, dtype=dtype)
    lib("lw_attention_inf_bf16" if bf16 else "lw_attention_inf", _ptr(q), _ptr(kk), _ptr(v), _ptr(readout),
        _ptr(aff), _ptr(top), k, b, ck, cv, h, w, int(radius), int(dilation), float(scale), *value_layout,
        value_bf16, *layout[1:], int(direct and accumulate), _ptr(act),
        int(act is not None and act.dtype != torch.bfloat16), _ptr(gtop), _ptr(relw), bias, alpha, _ptr(weight))
    if out is not None and not direct:
        readout = _store(out, readout, accumulate, relu_out)
    elif relu_out is not None and act is None:
        relu_out.copy_(torch.relu(readout))
    out_dtype = _result_dtype(query, key, value)
    return (readout if out is not None else readout.to(out_dtype), None if aff is None else aff.to(out_dtype),
            None if top is None else top.to(out_dtype), None if weight is None else weight.to(out_dtype))


def _store(out: Tensor, readout: Tensor, accumulate: bool, relu_out: Tensor | None) -> Tensor:
    """out (+)= readout (B x Cv x H x W, the same elements as out in order), relu_out = relu(out); returns out."""
    readout = readout.reshape(out.shape)
    if accumulate:
        out.add_(readout)
    else:
        out.copy_(readout)
    if relu_out is not None:
        relu_out.copy_(torch.relu(out))
    return out


def _same_layout(a: Tensor | None, b: Tensor) -> bool:
    return (a is not None and a.shape == b.shape and a.stride() == b.stride() and a.device == b.device
            and a.dtype in (torch.bfloat16, torch.float32))


def _out_layout(out: Tensor | None, b: int, cv: int, h: int, w: int, dtype: torch.dtype, nhwc: bool = False):
    """(out, batch stride, object stride, channels per object, pixel stride) when the kernel can write the readout
    into `out` (channels-last exactly when the value is)."""
    if out is None or out.dtype != dtype or out.device.type != "cpu" or out.shape[0] != b or out.shape[-2:] != (h, w):
        return None
    layout = _object_layout(out)
    return (out, *layout[1:]) if layout is not None and layout[0] == cv and bool(layout[4]) == nhwc else None


def local_weighted_sums_inference(
    weights: Tensor, values: list[Tensor], radius: int, dilation: int = 1, *, upsample: int = 1,
    out: list[Tensor] | None = None,
) -> list[Tensor]:
    """`local_weighted_sum(weights, v)` for each v of `values` (one or two, same size) in one pass over the weights.

    upsample=2: `weights` is at half the size of the values (B x (2d+1)^2 x H/2 x W/2, H and W even) and is
    upsampled to them by nearest neighbour (as SLMR, eq. 6-7) inside the kernel, without an upsampled copy.
    Weights pointing outside the image are ignored as long as they are finite. Inputs that need gradients (or no
    native kernels) take the autograd path. out: buffers for the results (used where shape and dtype fit).
    values[1] may be B x N x C x H x W with each object's block contiguous, or channels-last (read in place, as in
    `local_attention_inference`); its result then has that shape, contiguous or channels-last (H x W x N x C in
    memory).
    """
    if not 1 <= len(values) <= 2:
        raise ValueError(f"one or two value tensors, got {len(values)}")
    if upsample not in (1, 2):
        raise ValueError(f"upsample must be 1 or 2, got {upsample!r}")
    _check(radius, dilation, *((f"values[{i}]", v) for i, v in enumerate(values)), grouped=("values[1]",))
    b, h, w = values[0].shape[0], *values[0].shape[-2:]
    if weights.dim() != 4 or (weights.shape[0], weights.shape[2] * upsample, weights.shape[3] * upsample) != (b, h, w):
        raise ValueError(f"weights {tuple(weights.shape)} do not fit values of batch {b} and size {h}x{w} "
                         f"(upsample={upsample})")
    if weights.shape[1] != _window_size(radius):
        raise ValueError(f"weights need {_window_size(radius)} channels for radius {radius}, got {weights.shape[1]}")
    lib = None if needs_grad(weights, *values) else _native_for(radius, weights, *values)
    if lib is None:
        full = F.interpolate(weights, size=(h, w), mode="nearest") if upsample == 2 else weights
        return [local_weighted_sum(full, v.flatten(1, 2) if v.dim() == 5 else v, radius, dilation).view(v.shape)
                for v in values]
    dtype = _compute_dtype(weights, *values)
    bf16 = _bf16_inputs(lib, *values)  # values read as bf16; the (small) weights in float32
    wt, first = _prep(weights, dtype), values[0].contiguous() if bf16 else _prep(values[0], dtype)
    second, c2, layout2, bf16_2 = (_grouped_value(values[1], dtype, bf16, lib) if len(values) == 2
                                   else (None, 0, (0, 0, 1, 0), 0))
    _count_macs(b * h * w * _window_size(radius), first.shape[1] + c2)
    out = out or [None] * len(values)
    outs = [_output(out[0], values[0].shape, dtype)]
    out_layout2 = (0, 0, 1, 0)
    if second is not None:
        if layout2[3]:  # a channels-last value gives a channels-last result
            outs.append(_channels_last_output(out[1], values[1].shape, dtype))
            out_layout2 = _object_layout(outs[1])[1:]
        else:
            outs.append(_output(out[1], values[1].shape, dtype))
            out_layout2 = (c2 * h * w, c2 * h * w, c2, 0)
    lib("lw_wsum_inf_bf16" if bf16 else "lw_wsum_inf", _ptr(wt), _ptr(first), _ptr(outs[0]), first.shape[1],
        _ptr(second), _ptr(outs[1] if second is not None else None), c2, *layout2, bf16_2, *out_layout2, b, h, w,
        int(radius), int(dilation), int(upsample))
    return [o.to(_result_dtype(weights, v)) for o, v in zip(outs, values)]


def _channels_last_output(out: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """`out` when it is a channels-last B x [N x] C x H x W buffer (see `_object_layout`) of this shape and dtype,
    else a new one: B x H x W x N C in memory."""
    if out is not None and tuple(out.shape) == tuple(shape) and out.dtype == dtype and out.device.type == "cpu":
        layout = _object_layout(out)
        if layout is not None and layout[4]:
            return out
    b, h, w = shape[0], *shape[-2:]
    if len(shape) == 4:
        return torch.empty(b, h, w, shape[1], dtype=dtype).permute(0, 3, 1, 2)
    return torch.empty(b, h, w, shape[1], shape[2], dtype=dtype).permute(0, 3, 4, 1, 2)
