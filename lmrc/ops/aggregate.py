"""x4 bilinear upsampling of per-object logits and their soft aggregation in one native pass (`aggregate.c`): the
CPU inference path of `lmrc.model.aggregate.upsample_soft_aggregate`, which falls back to PyTorch without it."""
from __future__ import annotations

import os

import torch
from torch import Tensor

from lmrc.ops import _native

MAX_OBJECTS = 16  # per image, as aggregate.c's AG_MAX_OBJECTS


def upsample4_soft_aggregate_native(low: Tensor, valid_objects: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """low B x N x h x w logits -> (B x N x 4h x 4w logits, B x (N+1) x 4h x 4w probabilities), float32, or None where
    the native kernel does not apply (not a CPU float32/16-bit tensor, e.g. float64; autograd; more than MAX_OBJECTS
    objects; no compiler; `LMRC_LOCAL_WINDOW=plain`)."""
    if (os.environ.get("LMRC_LOCAL_WINDOW", "auto").strip().lower() == "plain" or low.device.type != "cpu"
            or low.dtype not in (torch.float32, torch.bfloat16, torch.float16) or low.dim() != 4 or not 1 <= low.shape[1] <= MAX_OBJECTS or min(low.shape[-2:]) < 1
            or (torch.is_grad_enabled() and low.requires_grad)):
        return None
    lib = _native.load(torch.float32)
    if lib is None:
        return None
    b, n, h, w = low.shape
    low = low.float().contiguous()
    valid = None if valid_objects is None else valid_objects.float().contiguous()
    logits = torch.empty(b, n, 4 * h, 4 * w)
    probs = torch.empty(b, n + 1, 4 * h, 4 * w)
    lib("ag_upsample4_aggregate", low.data_ptr(), None if valid is None else valid.data_ptr(), logits.data_ptr(),
        probs.data_ptr(), b, n, h, w)
    return logits, probs
