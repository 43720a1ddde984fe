"""The three memory reads of Section III-B: global (eq. 1-3), local (eq. 4-5), sequential local (eq. 6-8)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmrc.ops import local_window
from lmrc.ops.top_k import row_top_k


@dataclass
class ReadResult:
    """A readout with the similarities the memory comparator needs.

    readout: B x C x H x W; similarity: B x S x H x W (S memory positions per query, -inf where invalid);
    affinity: B x S x H x W (softmax of similarity; only kept for local reads, SLMR reuses it).
    reliability: the memory comparator's weight H when the read fused it (the readout is then H (.) R, eq. 10).
    """

    readout: Tensor
    similarity_top_k: Tensor | None
    affinity: Tensor | None = None
    reliability: Tensor | None = None  # B x 1 x H x W when the read applied the comparator's weight itself


def global_similarity(query_key: Tensor, memory_key: Tensor, scale: float) -> Tensor:
    """Eq. (1): S_ij = -scale * ||k^Q_i - k^G_j||^2. query_key B x C x HW, memory_key B x C x M -> B x M x HW."""
    dot = torch.einsum("bcm,bcn->bmn", memory_key, query_key)
    m_sq = memory_key.pow(2).sum(1).unsqueeze(2)
    q_sq = query_key.pow(2).sum(1).unsqueeze(1)
    return (2 * dot - m_sq - q_sq) * scale


def memory_key_sq(memory_key: Tensor) -> Tensor:
    """||k^G_j||^2 per memory position: B x C x M -> B x M (the memory bank keeps it per memory frame)."""
    return memory_key.pow(2).sum(1)


def global_memory_read(
    query_key: Tensor,
    memory_key: Tensor,
    memory_value: Tensor,
    scale: float,
    *,
    read_top_k: int | None = None,
    comparator_top_k: int = 0,
    chunk_size: int | None = None,
    memory_sq: Tensor | None = None,
) -> ReadResult:
    """GMR, eq. (1)-(3): softmax over all T*H*W memory positions, readout R^G = W^G x V^G.

    query_key: B x C x H x W; memory_key: B x C x M; memory_value: B x Cv x M (objects folded into Cv).
    read_top_k keeps only the k largest similarities per query in the softmax (STCN's inference trick); the
    readout is then a weighted sum of k gathered value rows per query instead of a product with all M (~8x less
    arithmetic at 1/16 of 480p), and the comparator's top-k is a prefix of the sorted k.
    comparator_top_k > 0 also returns the k largest similarities per query (B x k x H x W) for eq. (9).
    chunk_size bounds memory: query positions are processed in chunks of that many.
    memory_sq: ||k^G_j||^2 (B x M) if already known, e.g. kept by the memory bank.

    Layout: the similarity of a chunk is B x n x M, one contiguous row per query, so that the softmax, top-k
    and max run along contiguous memory; -scale*||q_i||^2 is the same along a row, so it is left out of the
    softmax (which it does not change) and only subtracted from the k similarities the comparator gets.
    sim_ij = scale * (2 q_i.k_j - ||k_j||^2) comes from one matrix product: the query gets a constant 1 as an extra
    channel and the memory key the matching -scale*||k_j||^2, so no separate pass adds the bias.
    """
    b, c, h, w = query_key.shape
    q = query_key.reshape(b, c, h * w)
    n = h * w
    m_sq = memory_key_sq(memory_key) if memory_sq is None else memory_sq
    keys = torch.cat([memory_key * (2 * scale), (m_sq * -scale).unsqueeze(1).to(memory_key.dtype)], 1)  # B x C+1 x M
    q_rows = torch.cat([q, q.new_ones(b, 1, n)], 1).transpose(1, 2)  # B x n x C+1
    keys = keys.to(q_rows.dtype)
    m = keys.shape[2]
    sparse = read_top_k is not None and read_top_k < m
    if sparse:  # each query reads k memory rows: position-major values make each row one contiguous gather
        value_rows = memory_value.transpose(1, 2).contiguous().view(b * m, -1)
        row_offsets = (torch.arange(b, device=keys.device) * m).view(b, 1, 1)
    step = n if chunk_size is None else max(1, chunk_size)
    readouts, tops = [], []
    for start in range(0, n, step):
        rows = q_rows[:, start: start + step]
        sim = torch.bmm(rows, keys)  # B x n x M: eq. (1) up to -scale*||q_i||^2, constant along a row
        if sparse:  # sorted, so the comparator's top-k is a prefix
            best, indices = row_top_k(sim, min(max(read_top_k, comparator_top_k), m))
            sim, indices = best[..., :read_top_k], indices[..., :read_top_k]
        if comparator_top_k:
            q_sq = rows[..., :c].pow(2).sum(2, keepdim=True) * scale
            top_k = (_pad_top_k(best[..., :comparator_top_k], comparator_top_k, 2) if sparse
                     else top_k_similarities(sim, comparator_top_k, dim=2))
            tops.append((top_k - q_sq).transpose(1, 2))
        affinity = torch.softmax(sim, dim=2)  # eq. (2), over the k best positions when sparse
        if sparse:  # eq. (3) with k non-zero weights per query: a weighted sum of k gathered value rows
            gathered = F.embedding_bag((indices + row_offsets).flatten(0, 1), value_rows, mode="sum",
                                       per_sample_weights=affinity.to(value_rows.dtype).flatten(0, 1))
            readouts.append(gathered.view(b, -1, value_rows.shape[1]).transpose(1, 2))
        else:
            readouts.append(torch.bmm(memory_value, affinity.to(memory_value.dtype).transpose(1, 2)))  # eq. (3)
    readout = (readouts[0] if len(readouts) == 1 else torch.cat(readouts, 2)).reshape(b, -1, h, w)
    top = None
    if comparator_top_k:
        top = (tops[0] if len(tops) == 1 else torch.cat(tops, 2)).reshape(b, -1, h, w)
    return ReadResult(readout, top)


def local_memory_read(
    query_key: Tensor, local_key: Tensor, local_value: Tensor, radius: int, scale: float, *, comparator_top_k: int = 0,
    keep_affinity: bool = True, readout_buffer: Tensor | None = None,
    reliability: tuple[Tensor, Tensor, float, float] | None = None,
) -> ReadResult:
    """LMR, eq. (4)-(5): the read restricted to a (2d+1)^2 window around each query position.

    query_key, local_key: B x Ck x H x W; local_value: B x Cv x H x W. O(HW (2d+1)^2) memory (Section III-E-4).
    Without autograd (inference) one native kernel computes the readout and the comparator's top-k; the affinity
    is then only written when `keep_affinity` (SLMR reads it at the next finer stage), else ReadResult.affinity is None.
    readout_buffer: where the inference kernel may write the readout (see `local_window.local_attention_inference`);
    ReadResult.readout then is that buffer. reliability = (global top-k, comparator 1x1 conv weights, bias, alpha):
    inference only, the comparator's weight is applied in the same kernel (ReadResult.reliability).
    """
    if not local_window.needs_grad(query_key, local_key, local_value):
        readout, affinity, top, weight = local_window.local_attention_inference(
            query_key, local_key, local_value, radius, scale=scale, top_k=comparator_top_k, affinity=keep_affinity,
            out=readout_buffer, reliability=reliability,
        )
        top = _pad_top_k(top, comparator_top_k, 1) if comparator_top_k else None
        return ReadResult(readout, top, affinity, weight)
    if reliability is not None:
        raise ValueError("the fused reliability weight is for inference (no gradients); use MemoryComparator")
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
    keep_affinity: bool = True,
    readout_buffer: Tensor | None = None,
    reliability: tuple[Tensor, Tensor, float, float] | None = None,
) -> ReadResult:
    """SLMR, eq. (6)-(8): reorganise stage-r local key/value with the stage r+1 local affinity, then read locally.

    coarse_affinity: B x (2d+1)^2 x H/2 x W/2, the LMR affinity W^{L_{r+1}}. Query position x uses the weights of
    its parent floor(x/2) for the offsets 2u, 2v: a dilation-2 window sum with the weights upsampled (nearest).
    Without autograd, eq. (6) and (7) are one kernel pass that reads the coarse weights directly, into reused
    scratch buffers (the reorganised key and value live only during this call). readout_buffer, reliability as in LMR.
    """
    if not local_window.needs_grad(query_key, local_key, local_value, coarse_affinity):
        h, w = query_key.shape[-2:]
        upsample = 2 if (coarse_affinity.shape[-2] * 2, coarse_affinity.shape[-1] * 2) == (h, w) else 1
        weights = coarse_affinity if upsample == 2 else F.interpolate(coarse_affinity, size=(h, w), mode="nearest")
        buffers = [local_window.scratch(f"slmr{i}", t.shape, torch.float64 if t.dtype == torch.float64 else torch.float32)
                   for i, t in enumerate((local_key, local_value))]
        sequential_key, sequential_value = local_window.local_weighted_sums_inference(
            weights, [local_key, local_value], radius, dilation=2, upsample=upsample, out=buffers
        )  # eq. (6), (7)
    else:
        weights = F.interpolate(coarse_affinity, size=query_key.shape[-2:], mode="nearest")
        sequential_key = local_window.local_weighted_sum(weights, local_key, radius, dilation=2)  # eq. (6)
        sequential_value = local_window.local_weighted_sum(weights, local_value, radius, dilation=2)  # eq. (7)
    return local_memory_read(query_key, sequential_key, sequential_value, radius, scale,
                             comparator_top_k=comparator_top_k, keep_affinity=keep_affinity,
                             readout_buffer=readout_buffer, reliability=reliability)  # eq. (8)


def top_k_similarities(similarity: Tensor, k: int, dim: int = 1) -> Tensor:
    """The k largest similarities along `dim` (Section III-C-1), e.g. B x S x ... -> B x k x ....

    With fewer than k candidates (a tiny memory or window) the smallest one is repeated, so the comparator's
    1x1 conv always sees k channels.
    """
    if similarity.stride(dim) != 1:
        # top-k along a strided dim (e.g. the window offsets of B x 25 x H x W) is ~2x slower than moving that dim
        # last, selecting along contiguous rows, and moving it back
        moved = similarity.movedim(dim, -1).contiguous()
        top = moved.topk(min(k, similarity.shape[dim]), dim=-1).values.movedim(-1, dim).contiguous()
    else:
        top = similarity.topk(min(k, similarity.shape[dim]), dim=dim).values
    return _pad_top_k(top, k, dim)


def _pad_top_k(top: Tensor, k: int, dim: int) -> Tensor:
    """Repeat the smallest of fewer than k values along `dim` up to k (see top_k_similarities)."""
    if top.shape[dim] < k:
        last = top.narrow(dim, top.shape[dim] - 1, 1)
        shape = list(top.shape)
        shape[dim] = k - top.shape[dim]
        top = torch.cat([top, last.expand(shape)], dim)
    return top
