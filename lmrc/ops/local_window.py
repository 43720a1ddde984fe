"""Local-window similarity and weighted sums: the kernels behind LMR (eq. 4-5) and SLMR (eq. 6-8).

Offsets o = (dy, dx) with dy, dx in [-d, d] are ordered row-major (dy outer, dx inner), so a window
tensor has (2d+1)^2 channels. A neighbour x + dilation * o outside the image never receives weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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


# Public entry points; the fast native kernels plug in here.
local_similarity = local_similarity_plain
local_weighted_sum = local_weighted_sum_plain
