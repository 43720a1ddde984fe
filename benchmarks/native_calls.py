"""Where a setting-F frame spends its time in lmrc's own native calls: the local reads (`lw_attention_inf`,
`lw_wsum_inf`) and the layout passes left between the encoders' channels-last tensors and the reads' NCHW ones
(`lmrc.ops.layout`: the keys, the stage-4 value and readouts), each call timed in the streaming Segmenter on the
synthetic 480p video with 2 objects, ms per frame over the frames after the warm-up. Precision: P (default: auto), threads: T (default 2), frames: N.

    .venv/bin/python benchmarks/native_calls.py
    P=fp32 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 LMRC_LOCAL_WINDOW_ISA=avx2 .venv/bin/python benchmarks/native_calls.py
"""
from __future__ import annotations

import collections
import os
import time

import torch

import lmrc.inference.fast_path as fast_path
import lmrc.inference.packed_conv as packed_conv
import lmrc.model.encoders as encoders
from lmrc.eval.bench import build_model, synthetic_video
from lmrc.inference.segmenter import Segmenter
from lmrc.ops import layout, local_window
from lmrc.utils.memory import reuse_freed_memory

WARMUP = 5


def timed(module, name: str, totals: dict, *aliases) -> None:
    """Replace module.name (and the same function imported elsewhere) by a wrapper adding its time to totals,
    keyed by name and the shape of its first tensor argument."""
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        first = args[1][-1] if name == "local_weighted_sums_inference" else args[0]
        totals[(name, tuple(first.shape))].append(time.perf_counter() - start)
        return result

    for owner in (module, *aliases):
        setattr(owner, name, wrapper)


def main() -> None:
    reuse_freed_memory()
    torch.set_num_threads(int(os.environ.get("T", "2")))
    frames = int(os.environ.get("N", "25"))
    totals: dict = collections.defaultdict(list)
    for name in ("local_attention_inference", "local_weighted_sums_inference"):
        timed(local_window, name, totals)
    timed(layout, "nhwc_to_nchw", totals, encoders)
    timed(layout, "add_nchw_groups_to_nhwc", totals, packed_conv, fast_path)
    segmenter = Segmenter(build_model("lmrc-lite", "F"), size=480, precision=os.environ.get("P", "auto"))
    print(f"lmrc-lite F, {segmenter.precision}, {torch.get_num_threads()} threads, {frames} frames "
          f"({WARMUP} warm-up); ms per frame:")
    for index, (rgb, mask) in enumerate(synthetic_video(frames)):
        if index == WARMUP:
            totals.clear()
        segmenter.step(rgb, mask)
    timed_frames = frames - WARMUP
    for (name, shape), times in sorted(totals.items(), key=lambda item: -sum(item[1])):
        print(f"{1e3 * sum(times) / timed_frames:7.2f}  {len(times) // timed_frames} call(s)  {name} {shape}")
    print(f"{1e3 * sum(map(sum, totals.values())) / timed_frames:7.2f}  in all")


if __name__ == "__main__":
    main()
