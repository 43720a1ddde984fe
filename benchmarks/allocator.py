"""Page faults and time per frame under three allocator set-ups, each in a fresh process (the choice is process-wide):
glibc's default, PyTorch's THP_MEM_ALLOC_ENABLE=1 (2 MB pages for large tensors), and `lmrc.utils.memory.reuse_freed_memory`
(mallopt: mmap off, no trim; what the lmrc command line uses). lmrc-lite F, 480p synthetic video, 1 thread, memory
of 4 frames, medians over frames 20-39.

    .venv/bin/python benchmarks/allocator.py
"""
from __future__ import annotations

import os
import subprocess
import sys

FRAME_LOOP = """
import os, resource, statistics, sys, time
if sys.argv[1] == "reuse":
    from lmrc.utils.memory import reuse_freed_memory
    assert reuse_freed_memory()
import torch
from lmrc.eval.bench import build_model, synthetic_video
from lmrc.inference.segmenter import Segmenter
torch.set_num_threads(1)
seg = Segmenter(build_model("lmrc-lite", "F"), size=480, max_memory_frames=4, precision="fp32")
times, faults = [], []
for rgb, mask in synthetic_video(40):
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    seg.step(rgb, mask)
    times.append(time.perf_counter() - start)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(f"{1000 * statistics.median(times[20:]):.1f} {statistics.median(faults[20:]):.0f} "
      f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
"""


def main() -> None:
    setups = {"glibc default": ("default", "0"), "THP_MEM_ALLOC_ENABLE=1": ("default", "1"),
              "reuse_freed_memory (lmrc CLI)": ("reuse", "0")}
    print(f"load average {os.getloadavg()}")
    print(f"{'allocator':32s} {'ms/frame':>9s} {'faults/frame':>13s} {'peak RSS MB':>12s}")
    for label, (mode, thp) in setups.items():
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": thp}
        out = subprocess.run([sys.executable, "-c", FRAME_LOOP, mode], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        print(f"{label:32s} {out[0]:>9s} {out[1]:>13s} {out[2]:>12s}")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
