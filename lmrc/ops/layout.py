"""Layout changes between channels-last (the convolutions') and NCHW (the memory reads') tensors: `layout.c` on
CPU, PyTorch elsewhere. PyTorch transposes a large channels-last image on one thread (`.contiguous()`, or a 2-D
copy of each image's H*W x C matrix); the native tiles run on every thread."""
from __future__ import annotations

import os

import torch
from torch import Tensor

from lmrc.ops import _native

# (input dtype, output dtype) -> kernel
_NATIVE = {(torch.bfloat16, torch.bfloat16): "ly_nhwc_to_nchw_bf16",
           (torch.float32, torch.float32): "ly_nhwc_to_nchw_f32",
           (torch.bfloat16, torch.float32): "ly_nhwc_bf16_to_nchw_f32"}


def _library(*tensors: Tensor):
    if os.environ.get("LMRC_LOCAL_WINDOW", "auto").strip().lower() == "plain":
        return None
    if any(t.device.type != "cpu" or (t.requires_grad and torch.is_grad_enabled()) for t in tensors):
        return None
    return _native.load(torch.float32)


def _channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)


def nhwc_to_nchw(x: Tensor, shared: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """x (B*N x C x H x W, channels-last) [+ shared (B x C x H x W, channels-last) broadcast over each group of N
    images] as a contiguous NCHW tensor of x's shape in `dtype` (default x's). The sum is taken in float32 and
    rounded once to `dtype`, as PyTorch's bf16 addition does; bf16 widened to float32 is not rounded at all."""
    dtype = dtype or x.dtype
    n = 1 if shared is None else x.shape[0] // shared.shape[0]
    lib = _library(x) if shared is None else _library(x, shared)
    name = _NATIVE.get((x.dtype, dtype))
    # A plain transpose of an image that fits in cache is as fast in PyTorch (no call overhead): native from 1M
    # elements per image; a sum or a widening is always faster here (one pass instead of two).
    # (the kernel keeps a 32 x C tile on its thread's stack: at most 1024 channels)
    usable = (lib is not None and name is not None and _channels_last(x) and x.shape[1] <= 1024
              and (shared is not None or dtype != x.dtype or x[0].numel() >= 1 << 20)
              and (shared is None or (_channels_last(shared) and shared.dtype == x.dtype
                                      and shared.shape[1:] == x.shape[1:] and shared.shape[0] * n == x.shape[0])))
    if not usable:
        if shared is None:
            return x.to(dtype, memory_format=torch.contiguous_format)
        b = shared.shape[0]
        wide = torch.promote_types(x.dtype, dtype)
        total = x.to(wide).view(b, n, *x.shape[1:]) + shared.to(wide).unsqueeze(1)
        return total.reshape(x.shape).to(dtype, memory_format=torch.contiguous_format)
    images, c, h, w = x.shape
    out = torch.empty(x.shape, dtype=dtype)
    lib(name, x.data_ptr(), None if shared is None else shared.data_ptr(), out.data_ptr(), images, n, c, h * w)
    return out


def add_nchw_groups_to_nhwc(out: Tensor, groups: Tensor, activated: Tensor | None = None) -> None:
    """out (B x C x H x W, float32, channels-last) += the sum of groups (B x G x C x H x W, float32, contiguous) over
    G, in place, the groups added in order. activated (out's shape, channels-last, bf16 or float32): also receives
    relu(out), in the same pass on CPU."""
    b, g, c, h, w = groups.shape
    lib = _library(out, groups)
    act_ok = activated is None or (_channels_last(activated) and activated.shape == out.shape
                                   and activated.dtype in (torch.bfloat16, torch.float32))
    if (lib is None or out.dtype != torch.float32 or groups.dtype != torch.float32 or not _channels_last(out)
            or not groups.is_contiguous() or tuple(out.shape) != (b, c, h, w) or not act_ok):
        for index in range(g):
            out.add_(groups[:, index])
        if activated is not None:
            activated.copy_(torch.relu(out))
        return
    lib("ly_add_nchw_groups_to_nhwc_f32", groups.data_ptr(), out.data_ptr(),
        None if activated is None else activated.data_ptr(), b, g, c, h * w,
        int(activated is not None and activated.dtype == torch.float32))
