"""Literal, slow references for LMR (eq. 4-5) and SLMR (eq. 6-7), for tests and the benchmark only.

They share no indexing code with `local_window`: LMR builds the dense HW x HW matrices of the paper and
SLMR loops over pixels and offsets in Python. Positions use the paper's (x, y) = (row, column).
"""
from __future__ import annotations

import torch
from torch import Tensor


def window_mask(height: int, width: int, radius: int, dilation: int = 1, device=None) -> Tensor:
    """HW x HW bool: j in N_i, i.e. j = i + dilation * (u, v) with |u|, |v| <= d (eq. 4)."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    dr = rows[None, :] - rows[:, None]
    dc = cols[None, :] - cols[:, None]
    reach = radius * dilation
    return (dr.abs() <= reach) & (dc.abs() <= reach) & (dr % dilation == 0) & (dc % dilation == 0)


def local_memory_read_reference(
    query: Tensor, key: Tensor, value: Tensor, radius: int, scale: float = 1.0, dilation: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. (4)-(5) densely: returns (readout B x Cv x H x W, S and W as B x HW x HW), -inf / 0 outside N_i."""
    b, ck, h, w = query.shape
    q = query.reshape(b, ck, h * w).transpose(1, 2)  # B x HW x Ck, row i = k_i^Q
    k = key.reshape(b, ck, h * w).transpose(1, 2)
    v = value.reshape(b, value.shape[1], h * w).transpose(1, 2)  # B x HW x Cv
    # ||q_i - k_j||^2 expanded so that the HW x HW matrix is the largest temporary (no HW x HW x C tensor)
    dist = q.pow(2).sum(-1, keepdim=True) - 2 * q @ k.transpose(1, 2) + k.pow(2).sum(-1)[:, None, :]
    sim = (-scale * dist).masked_fill(~window_mask(h, w, radius, dilation, query.device), float("-inf"))
    aff = torch.softmax(sim, dim=-1)
    readout = (aff @ v).transpose(1, 2).reshape(b, value.shape[1], h, w)
    return readout, sim, aff


def window_to_4d(window: Tensor, radius: int, dilation: int = 1, fill: float = 0.0) -> Tensor:
    """B x (2d+1)^2 x h x w window tensor -> W~(x, y, p, q) as B x h x w x h x w (fill where no offset reaches)."""
    b, n, h, w = window.shape
    side = 2 * radius + 1
    assert n == side * side, "window channels must be (2d+1)^2"
    out = window.new_full((b, h, w, h, w), fill)
    for x in range(h):
        for y in range(w):
            for index in range(n):
                u, v = index // side - radius, index % side - radius  # row-major: u (rows) outer
                p, q = x + dilation * u, y + dilation * v
                if 0 <= p < h and 0 <= q < w:
                    out[:, x, y, p, q] = window[:, index, x, y]
    return out


def sequential_reorganise_reference(coarse_affinity_4d: Tensor, fine: Tensor, radius: int) -> Tensor:
    """Eq. (6)/(7): K^S(x, y) = sum_{u,v} W~(x̄, ȳ, x̄+u, ȳ+v) K~(x+2u, y+2v), x̄ = floor(x/2); B x C x H x W."""
    b, c, height, width = fine.shape
    h, w = coarse_affinity_4d.shape[1:3]
    out = torch.zeros_like(fine)
    for x in range(height):
        for y in range(width):
            xb, yb = x // 2, y // 2
            for u in range(-radius, radius + 1):
                for v in range(-radius, radius + 1):
                    p, q = xb + u, yb + v
                    fx, fy = x + 2 * u, y + 2 * v
                    # W~ only exists inside the coarse image, K~ only inside the fine one: else no term
                    if not (0 <= p < h and 0 <= q < w and 0 <= fx < height and 0 <= fy < width):
                        continue
                    out[:, :, x, y] += coarse_affinity_4d[:, xb, yb, p, q, None] * fine[:, :, fx, fy]
    return out
