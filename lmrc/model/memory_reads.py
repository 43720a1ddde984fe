"""The three memory reads of Section III-B: global (eq. 1-3), local (eq. 4-5), sequential local (eq. 6-8)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from lmrc.ops import local_window
from lmrc.ops.top_k import matmul_top_k, row_top_k


@dataclass
class ReadResult:
    """A readout with the similarities the memory comparator needs.

    readout: B x C x H x W; similarity: B x S x H x W (S memory positions per query, -inf where invalid);
    affinity: B x S x H x W (softmax of similarity; only kept for local reads, SLMR reuses it).
    reliability: B x 1 x H x W, the memory comparator's weight H when the read applied it itself (the readout is
    then H (.) R, eq. 10; the inference fast path's fused kernels).
    """

    readout: Tensor
    similarity_top_k: Tensor | None
    affinity: Tensor | None = None
    reliability: Tensor | None = None


def memory_key_sq(memory_key: Tensor) -> Tensor:
    """||k^G_j||^2 per memory position: B x C x M -> B x M (the memory bank keeps it per memory frame)."""
    return memory_key.pow(2).sum(1)


def global_similarity(query_key: Tensor, memory_key: Tensor, scale: float, *, memory_sq: Tensor | None = None,
                      chunk_size: int | None = None) -> Iterator[tuple[int, Tensor]]:
    """Eq. (1), S_ij = -scale * ||k^Q_i - k^G_j||^2, up to -scale*||k^Q_i||^2: a constant along each query's row,
    which neither the softmax (eq. 2) nor a top-k changes (`global_memory_read` adds it back where the value counts).

    query_key B x C x n, memory_key B x C x M -> yields (first row, B x rows x M) for chunks of at most `chunk_size`
    query rows (all at once when None), one contiguous row per query. scale * (2 q_i.k_j - ||k_j||^2) comes from one
    matrix product: the query gets a constant 1 as an extra channel and the memory key the matching
    -scale*||k_j||^2, so no separate pass adds the bias. memory_sq: ||k_j||^2 (B x M) if already known.
    """
    b, c, n = query_key.shape
    m_sq = memory_key_sq(memory_key) if memory_sq is None else memory_sq
    keys = torch.cat([memory_key * (2 * scale), (m_sq * -scale).unsqueeze(1).to(memory_key.dtype)], 1)  # B x C+1 x M
    rows = torch.cat([query_key, query_key.new_ones(b, 1, n)], 1).transpose(1, 2)  # B x n x C+1
    if rows.dtype != keys.dtype:  # the dtype autocast would compute the product in, cast once here (not per chunk)
        device = rows.device.type
        common = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                  else torch.promote_types(rows.dtype, keys.dtype))
        rows, keys = rows.to(common), keys.to(common)
    step = n if chunk_size is None else max(1, chunk_size)
    for start in range(0, n, step):
        yield start, torch.bmm(rows[:, start: start + step], keys)


def global_similarity_top_k(query_key: Tensor, memory_key: Tensor, scale: float, k: int, *,
                            memory_sq: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """The k largest similarities of `global_similarity` per query (B x n x k, descending, float32) and their memory
    positions, the product and the top-k fused on AMX tiles (`lmrc.ops.top_k.matmul_top_k`: the n x M similarity
    matrix is never written). For bf16 memory keys (a bf16 read computes its product in bf16 anyway) on a CPU with
    AMX, without autograd; None elsewhere (the caller takes `global_similarity`)."""
    if memory_key.dtype != torch.bfloat16:
        return None
    m_sq = memory_key_sq(memory_key.float()) if memory_sq is None else memory_sq
    values, indices = [], []
    for b in range(query_key.shape[0]):
        top = matmul_top_k((query_key[b] * (2 * scale)).t(), memory_key[b], m_sq[b].float() * -scale, k)
        if top is None:
            return None
        values.append(top[0])
        indices.append(top[1])
    return torch.stack(values), torch.stack(indices)


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
    """
    b, c, h, w = query_key.shape
    q = query_key.reshape(b, c, h * w)
    m = memory_key.shape[2]
    sparse = read_top_k is not None and read_top_k < m
    if sparse:  # each query reads k memory rows: position-major values make each row one contiguous gather
        value_rows = memory_value.transpose(1, 2).contiguous().view(b * m, -1)
        row_offsets = (torch.arange(b, device=memory_key.device) * m).view(b, 1, 1)
    readouts, tops = [], []
    kept = min(max(read_top_k, comparator_top_k), m) if sparse else 0  # sorted: the comparator's top-k is a prefix
    fused = global_similarity_top_k(q, memory_key, scale, kept, memory_sq=memory_sq) if sparse else None
    if fused is not None:
        parts = [(0, *fused)]
    else:
        parts = ((start, *(row_top_k(sim, kept) if sparse else (sim, None)))
                 for start, sim in global_similarity(q, memory_key, scale, memory_sq=memory_sq, chunk_size=chunk_size))
    for start, best, indices in parts:  # best: the chunk's similarities, or its sorted k best when sparse
        sim = best
        if sparse:
            sim, indices = best[..., :read_top_k], indices[..., :read_top_k]
        if comparator_top_k:
            rows = q[:, :, start: start + sim.shape[1]]
            q_sq = rows.pow(2).sum(1).unsqueeze(2) * scale  # the row constant of eq. (1)
            top_k = (pad_top_k(best[..., :comparator_top_k], comparator_top_k, 2) if sparse
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
) -> ReadResult:
    """LMR, eq. (4)-(5): the read restricted to a (2d+1)^2 window around each query position.

    query_key, local_key: B x Ck x H x W; local_value: B x Cv x H x W. O(HW (2d+1)^2) memory (Section III-E-4).
    The affinity is returned too: SLMR reads it at the next finer stage.
    """
    readout, similarity, affinity = local_window.local_attention(query_key, local_key, local_value, radius, scale=scale)
    top = top_k_similarities(similarity, comparator_top_k) if comparator_top_k else None
    return ReadResult(readout, top, affinity)


def sequential_local_memory_read(
    query_key: Tensor, local_key: Tensor, local_value: Tensor, coarse_affinity: Tensor, radius: int, scale: float, *,
    comparator_top_k: int = 0,
) -> ReadResult:
    """SLMR, eq. (6)-(8): reorganise stage-r local key/value with the stage r+1 local affinity, then read locally.

    coarse_affinity: B x (2d+1)^2 x H/2 x W/2, the LMR affinity W^{L_{r+1}}. Query position x uses the weights of
    its parent floor(x/2) for the offsets 2u, 2v: a dilation-2 window sum with the weights upsampled (nearest).
    """
    weights = F.interpolate(coarse_affinity, size=query_key.shape[-2:], mode="nearest")
    sequential_key = local_window.local_weighted_sum(weights, local_key, radius, dilation=2)  # eq. (6)
    sequential_value = local_window.local_weighted_sum(weights, local_value, radius, dilation=2)  # eq. (7)
    return local_memory_read(query_key, sequential_key, sequential_value, radius, scale,
                             comparator_top_k=comparator_top_k)  # eq. (8)


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
    return pad_top_k(top, k, dim)


def pad_top_k(top: Tensor, k: int, dim: int) -> Tensor:
    """Repeat the smallest of fewer than k values along `dim` up to k (see top_k_similarities)."""
    if top.shape[dim] < k:
        last = top.narrow(dim, top.shape[dim] - 1, 1)
        shape = list(top.shape)
        shape[dim] = k - top.shape[dim]
        top = torch.cat([top, last.expand(shape)], dim)
    return top
