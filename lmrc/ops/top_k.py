"""The k largest entries of each row, for the global read's top-k (`top_k.c` on CPU, `torch.topk` elsewhere)."""
from __future__ import annotations

import os

import torch
from torch import Tensor

from lmrc.ops import _native


def row_top_k(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`x.topk(k, dim=-1)` (largest, sorted): values and int64 indices, ... x k.

    Without autograd, for a contiguous float32/float64/bfloat16 CPU tensor, a native threshold scan does it (about
    10x faster for k = 20 of thousands); ties may pick a different index than torch.topk. `LMRC_LOCAL_WINDOW=plain`
    selects torch.topk, as it does for the local-window kernels.
    """
    if not 1 <= k <= x.shape[-1]:
        raise ValueError(f"top-k of {k} from rows of {x.shape[-1]}")
    lib = None
    plain = os.environ.get("LMRC_LOCAL_WINDOW", "auto").strip().lower() == "plain"
    bf16 = x.dtype == torch.bfloat16
    if (not plain and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64, torch.bfloat16)
            and x.is_contiguous() and not (torch.is_grad_enabled() and x.requires_grad)):
        lib = _native.load(torch.float32 if bf16 else x.dtype)
        if bf16 and lib is not None and not lib.bf16_inputs:
            lib = None
    if lib is None:
        return x.topk(k, dim=-1)
    rows, cols = x.numel() // x.shape[-1], x.shape[-1]
    values = torch.empty(*x.shape[:-1], k, dtype=torch.float32 if bf16 else x.dtype)
    indices = torch.empty(*x.shape[:-1], k, dtype=torch.int64)
    lib("tk_rows_bf16" if bf16 else "tk_rows", x.data_ptr(), rows, cols, k, values.data_ptr(), indices.data_ptr())
    if bf16:
        values = values.to(torch.bfloat16)  # exact: they are the row's own values
    return values, indices
