"""Median / mean ms per frame of the streaming Segmenter of whichever lmrc is first on sys.path, 1 thread, on the
synthetic 854x480 video of `lmrc bench` (copied here: older trees have no bench). Used for before/after figures:

    git worktree add /tmp/lmrc-old 42fe67b
    PYTHONPATH=/tmp/lmrc-old .venv/bin/python benchmarks/end_to_end.py lmrc-lite F 10 3   # before
    PYTHONPATH=$PWD          .venv/bin/python benchmarks/end_to_end.py lmrc-lite F 10 3   # after
"""
import sys, time, statistics, os, torch, numpy as np
torch.set_num_threads(1)
from lmrc.config import model_config
from lmrc.model.network import LMRC
from lmrc.inference.segmenter import Segmenter
name, setting, frames, warm = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def synthetic_video(frames, size=(480, 854), objects=2, seed=0):
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    background = (rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)[:h, :w] // 2 + 64).astype(np.uint8)
    colours = rng.integers(64, 256, (objects, 3))
    radius = np.stack([rng.uniform(0.08, 0.18, objects) * h, rng.uniform(0.08, 0.18, objects) * w], 1)
    centre = np.stack([rng.uniform(0.3, 0.7, objects) * h, rng.uniform(0.3, 0.7, objects) * w], 1)
    phase = rng.uniform(0, 2 * np.pi, objects)
    for t in range(frames):
        rgb = background.copy(); ids = np.zeros((h, w), np.uint8)
        for k in range(objects):
            cy = centre[k, 0] + 0.2 * h * np.sin(0.05 * t + phase[k]); cx = centre[k, 1] + 0.25 * w * np.cos(0.03 * t + phase[k])
            inside = ((yy - cy) / radius[k, 0]) ** 2 + ((xx - cx) / radius[k, 1]) ** 2 <= 1
            rgb[inside] = colours[k]; ids[inside] = k + 1
        yield rgb, (ids if t == 0 else None)
torch.manual_seed(0)
seg = Segmenter(LMRC(model_config(name, setting=setting), pretrained_backbone=False).eval(), size=480, precision="fp32")
ts = []
l0 = os.getloadavg()
for rgb, m in synthetic_video(frames):
    s = time.perf_counter(); seg.step(rgb, m); ts.append(time.perf_counter() - s)
ts = ts[warm:]
print(f"{sys.argv[1]} {setting}: median {1000*statistics.median(ts):.1f} ms, mean {1000*statistics.fmean(ts):.1f} ms, load {l0} -> {os.getloadavg()}")
