"""Global memory read (GMR, eq. 1-3) at 1/16 of 480p: the previous layout (similarity B x M x n, memory-major)
against `lmrc.model.memory_reads.global_memory_read` (per-query rows, key norms kept, bias folded into the GEMM)
over all memory positions, and with the top-20 read lmrc uses at inference, side by side in one process, for T
memory frames. 2 objects x 256 value channels, 64-channel keys, 1 thread, chunks as `LMRC.read_and_decode` uses.

    .venv/bin/python benchmarks/global_read.py
"""
from __future__ import annotations

import os
import time

import torch

from lmrc.utils.memory import reuse_freed_memory

from lmrc.model.memory_reads import global_memory_read, memory_key_sq, top_k_similarities


def previous_global_read(query_key, memory_key, memory_value, scale, comparator_top_k=0, chunk_size=4096):
    """The layout before: B x M x n similarity, norms recomputed per query, top-k along a strided dim."""
    b, c, h, w = query_key.shape
    q = query_key.reshape(b, c, h * w)
    readouts, tops = [], []
    for start in range(0, h * w, chunk_size):
        qc = q[:, :, start: start + chunk_size]
        dot = torch.einsum("bcm,bcn->bmn", memory_key, qc)
        sim = (2 * dot - memory_key.pow(2).sum(1).unsqueeze(2) - qc.pow(2).sum(1).unsqueeze(1)) * scale
        if comparator_top_k:
            tops.append(top_k_similarities(sim, comparator_top_k))
        readouts.append(torch.bmm(memory_value, torch.softmax(sim, dim=1)))
    return torch.cat(readouts, 2).view(b, -1, h, w)


def timed(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[repeats // 2]


def main() -> None:
    reuse_freed_memory()  # as the lmrc command line does
    torch.set_num_threads(1)
    q = torch.randn(1, 64, 30, 54)
    print(f"load average {os.getloadavg()}")
    for frames in (2, 5, 10, 20):
        m = frames * 30 * 54
        mk, mv = torch.randn(1, 64, m), torch.randn(1, 512, m)
        sq = memory_key_sq(mk)
        chunk = max(1, (1 << 22) // m)
        with torch.inference_mode():
            old_k = timed(lambda: previous_global_read(q, mk, mv, 0.125, comparator_top_k=5))
            new_k = timed(lambda: global_memory_read(q, mk, mv, 0.125, comparator_top_k=5, chunk_size=chunk, memory_sq=sq))
            top_k = timed(lambda: global_memory_read(q, mk, mv, 0.125, read_top_k=20, comparator_top_k=5,
                                                     chunk_size=chunk, memory_sq=sq))
            old = timed(lambda: previous_global_read(q, mk, mv, 0.125))
            new = timed(lambda: global_memory_read(q, mk, mv, 0.125, chunk_size=chunk, memory_sq=sq))
        print(f"T={frames:2d}  with comparator top-k: before {old_k:7.1f} ms, all positions {new_k:7.1f} ms, "
              f"top-20 {top_k:7.1f} ms | setting A (no comparator): before {old:7.1f} ms, after {new:7.1f} ms")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
