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


def amx_library():
    """The native library whose AMX kernel this CPU can run (AMX-BF16 tiles, the float AVX-512 build), else None."""
    from lmrc.utils.device import cpu_flags

    if os.environ.get("LMRC_LOCAL_WINDOW", "auto").strip().lower() == "plain":
        return None
    if not {"amx_tile", "amx_bf16"} <= cpu_flags():
        return None
    lib = _native.load(torch.float32)
    return lib if lib is not None and getattr(lib, "amx", False) else None


def matmul_top_k(rows: Tensor, keys: Tensor, bias: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """The k largest entries of each row of `rows @ keys + bias` (sorted, descending) and their columns, with the
    product made on AMX tiles a 16 x 16 block at a time and scanned in cache: the n x M matrix is never written.

    rows n x C, keys C x M (multiplied in bfloat16, summed in float32), bias M (float32), C 32 or 64, k <= M. Returns
    (float32 values, int64 indices), both n x k; None where this CPU or build has no AMX kernel, or Linux refuses
    the tile state: the caller then takes the matrix product. Ties may pick other columns than torch.topk.
    """
    n, c = rows.shape
    m = keys.shape[1]
    lib = amx_library()
    if (lib is None or keys.shape[0] != c or c not in (32, 64) or not 1 <= k <= m or bias.shape != (m,)
            or any(t.device.type != "cpu" or (torch.is_grad_enabled() and t.requires_grad) for t in (rows, keys, bias))):
        return None
    n16, m16 = -(-n // 16) * 16, -(-m // 16) * 16
    query = torch.zeros(n16, c, dtype=torch.bfloat16)
    query[:n] = rows
    pairs = torch.zeros(c // 2, m16, 2, dtype=torch.bfloat16)  # the tiles' layout: channel pairs x positions x 2
    pairs[:, :m] = keys.view(c // 2, 2, m).transpose(1, 2)
    padded_bias = torch.full((m16,), float("-inf"))  # padding positions never enter a top-k
    padded_bias[:m] = bias
    values = torch.empty(n, k)
    indices = torch.empty(n, k, dtype=torch.int64)
    if lib("tk_matmul_amx", query.data_ptr(), n, c, pairs.data_ptr(), padded_bias.data_ptr(), m16, k,
           values.data_ptr(), indices.data_ptr()) != 0:
        return None
    if n and int(indices.min()) < 0:  # a row with fewer than k entries above -inf (non-finite inputs)
        return None
    _native.count_macs("matrix_product", n * m * (c + 1))  # as the product with the bias as one more channel
    return values, indices
