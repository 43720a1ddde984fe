"""The three memory reads of Section III-B: global (eq. 1-3), local (eq. 4-5), sequential local (eq. 6-8)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmrc.ops import local_window


@dataclass
class ReadResult:
    """A readout with the similarities the memory comparator needs.

    readout: B x C x H x W; similarity: B x S x H x W (S memory positions per query, -inf where invalid);
    affinity: B x S x H x W (softmax of similarity; only kept for local reads, SLMR reuses it).
    """

    readout: Tensor
    similarity_top_k: Tensor | None
    affinity: Tensor | None = None


def global_similarity(query_key: Tensor, memory_key: Tensor, scale: float) -> Tensor:
    """Eq. (1): S_ij = -scale * ||k^Q_i - k^G_j||^2. query_key B x C x HW, memory_key B x C x M -> B x M x HW."""
    # ||q||^2 is constant along the softmax axis but not for the comparator, which compares absolute similarities.
    dot = torch.einsum("bcm,bcn->bmn", memory_key, query_key)
    m_sq = memory_key.pow(2).sum(1).unsqueeze(2)
    q_sq = query_key.pow(2).sum(1).unsqueeze(1)
    return (2 * dot - m_sq - q_sq) * scale


def global_memory_read(
    query_key: Tensor,
    memory_key: Tensor,
    memory_value: Tensor,
    scale: float,
    *,
    read_top_k: int | None = None,
    comparator_top_k: int = 0,
    chunk_size: int | None = None,
) -> ReadResult:
    """GMR, eq. (1)-(3): softmax over all T*H*W memory positions, readout R^G = W^G x V^G.

    query_key: B x C x H x W; memory_key: B x C x M; memory_value: B x Cv x M (objects folded into Cv).
    read_top_k keeps only the k largest similarities per query in the softmax (STCN's inference trick).
    comparator_top_k > 0 also returns the k largest similarities per query (B x k x H x W) for eq. (9).
    chunk_size bounds memory: query positions are processed in chunks of that many.
    """
    b, c, h, w = query_key.shape
    q = query_key.reshape(b, c, h * w)
    n = h * w
    step = n if chunk_size is None else max(1, chunk_size)
    readouts, tops = [], []
    for start in range(0, n, step):
        sim = global_similarity(q[:, :, start: start + step], memory_key, scale)  # B x M x n
        if comparator_top_k:
            tops.append(top_k_similarities(sim, comparator_top_k))
        if read_top_k is not None and read_top_k < sim.shape[1]:
            values, indices = sim.topk(read_top_k, dim=1)
            sim = torch.full_like(sim, float("-inf")).scatter_(1, indices, values)
        affinity = torch.softmax(sim, dim=1)  # eq. (2)
        readouts.append(torch.bmm(memory_value, affinity.to(memory_value.dtype)))  # eq. (3)
    readout = torch.cat(readouts, 2).view(b, -1, h, w)
    top = torch.cat(tops, 2).view(b, -1, h, w) if comparator_top_k else None
    return ReadResult(readout, top)


def local_memory_read(
    query_key: Tensor, local_key: Tensor, local_value: Tensor, radius: int, scale: float, *, comparator_top_k: int = 0
) -> ReadResult:
    """LMR, eq. (4)-(5): the read restricted to a (2d+1)^2 window around each query position.

    query_key, local_key: B x Ck x H x W; local_value: B x Cv x H x W. O(HW (2d+1)^2) memory (Section III-E-4).
    """
    readout, similarity, affinity = local_window.local_attention(query_key, local_key, local_value, radius, scale=scale)
    top = top_k_similarities(similarity, comparator_top_k) if comparator_top_k else None
    return ReadResult(readout, top, affinity)


def sequential_local_memory_read(
    query_key: Tensor,
    local_key: Tensor,
    local_value: Tensor,
    coarse_affinity: Tensor,
    radius: int,
    scale: float,
    *,
    comparator_top_k: int = 0,
) -> ReadResult:
    """SLMR, eq. (6)-(8): reorganise stage-r local key/value with the stage r+1 local affinity, then read locally.

    coarse_affinity: B x (2d+1)^2 x H/2 x W/2, the LMR affinity W^{L_{r+1}}. Query position x uses the weights of
    its parent floor(x/2) for the offsets 2u, 2v: a dilation-2 window sum with the weights upsampled (nearest).
    """
    weights = F.interpolate(coarse_affinity, size=query_key.shape[-2:], mode="nearest")
    sequential_key = local_window.local_weighted_sum(weights, local_key, radius, dilation=2)  # eq. (6)
    sequential_value = local_window.local_weighted_sum(weights, local_value, radius, dilation=2)  # eq. (7)
    return local_memory_read(query_key, sequential_key, sequential_value, radius, scale, comparator_top_k=comparator_top_k)  # eq. (8)


def top_k_similarities(similarity: Tensor, k: int) -> Tensor:
    """The k largest similarities along dim 1 (Section III-C-1), B x S x ... -> B x k x ....

    With fewer than k candidates (a tiny memory or window) the smallest one is repeated, so the comparator's
    1x1 conv always sees k channels.
    """
    top = similarity.topk(min(k, similarity.shape[1]), dim=1).values
    if top.shape[1] < k:
        top = torch.cat([top, top[:, -1:].expand(-1, k - top.shape[1], *top.shape[2:])], 1)
    return top
