"""The first convolution of lmrc-lite's value trunk, computed from the objects' masks: `mask_conv.c` on CPU,
PyTorch elsewhere (and the reference the native kernel is tested against)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from lmrc.ops import _native


def mask_stem_input(masks: Tensor) -> Tensor:
    """masks B x N x H x W -> B*N x 2 x H x W: each object's mask and the other objects' (their sum)."""
    b, n, h, w = masks.shape
    others = masks.sum(1, keepdim=True) - masks
    return torch.stack([masks, others], 2).view(b * n, 2, h, w)


def mask_stem_conv_plain(masks: Tensor, weight: Tensor, bias: Tensor, dtype: torch.dtype) -> Tensor:
    """relu(conv2d(mask_stem_input(masks), weight, bias, stride 2, padding 1)), channels-last, in `dtype`."""
    x = F.relu(F.conv2d(mask_stem_input(masks).to(weight.dtype), weight, bias, stride=2, padding=1))
    return x.to(dtype, memory_format=torch.channels_last)


def mask_stem_conv(masks: Tensor, weight: Tensor, bias: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The value trunk's first conv + ReLU on (mask, other objects) of every object: masks B x N x H x W (soft, any
    float dtype), weight C x 2 x 3 x 3 (stride 2, padding 1), bias C -> B*N x C x ceil(H/2) x ceil(W/2),
    channels-last, in `dtype` (float32 or bfloat16). On CPU without autograd the native kernel computes it in float32
    and rounds once; its result equals the plain convolution's up to float rounding (tested)."""
    lib = None
    c = weight.shape[0]
    if (os.environ.get("LMRC_LOCAL_WINDOW", "auto").strip().lower() != "plain" and masks.device.type == "cpu"
            and masks.dim() == 4 and masks.numel() > 0 and tuple(weight.shape[1:]) == (2, 3, 3)
            and dtype in (torch.float32, torch.bfloat16)
            and not (torch.is_grad_enabled() and (masks.requires_grad or weight.requires_grad))):
        lib = _native.load(torch.float32)
        vl = (lib.vector_bytes or 0) // 4 if lib is not None else 0
        if not vl or c % vl or c // vl > 8:  # the kernel keeps C / VL <= 8 vectors per pixel in registers
            lib = None
    if lib is None:
        return mask_stem_conv_plain(masks, weight, bias, dtype)
    b, n, h, w = masks.shape
    _native.count_macs("convolution", b * n * c * ((h + 1) // 2) * ((w + 1) // 2) * 2 * 9)  # as the plain conv
    masks = masks.float().contiguous()
    weight = weight.detach().float()
    taps_other = weight[:, 1].reshape(c, 9).t().contiguous()  # 9 x C: W1
    taps_difference = (weight[:, 0] - weight[:, 1]).reshape(c, 9).t().contiguous()  # 9 x C: W0 - W1
    bias = bias.detach().float().contiguous()
    out = torch.empty(b * n, c, (h + 1) // 2, (w + 1) // 2, dtype=dtype, memory_format=torch.channels_last)
    lib("mc_mask_stem", masks.data_ptr(), taps_other.data_ptr(), taps_difference.data_ptr(), bias.data_ptr(),
        out.data_ptr(), b, n, h, w, c, int(dtype == torch.float32))
    return out
