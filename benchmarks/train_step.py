"""Seconds per training step of lmrc-lite (forward + backward + Adam), fp32 and bf16 autocast side by side.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/train_step.py   # 3-frame paper sample, batch 4, 256x256
    FRAMES=3,8 PRECISIONS=fp32 STEPS=2 PYTHONPATH=. python benchmarks/train_step.py   # 3- vs 8-frame clips

Clips run through lmrc.train.clip_pass.clip_forward (3 frames: exactly LMRC.forward), global memory every 5 frames.

Random inputs (the data loader is not timed). Prints the CPU model so every figure says where it came from.
"""
from __future__ import annotations

import os
import platform
import time

import torch

from lmrc.config import ModelConfig
from lmrc.model.network import LMRC
from lmrc.train.clip_pass import clip_forward
from lmrc.train.trainer import set_train_mode


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    frame_counts = [int(f) for f in os.environ.get("FRAMES", "3").split(",")]
    steps = int(os.environ.get("STEPS", "4"))
    batch = int(os.environ.get("BATCH", "4"))
    size = int(os.environ.get("SIZE", "256"))
    setting = os.environ.get("SETTING", "F")
    precisions = os.environ.get("PRECISIONS", "fp32,bf16").split(",")
    torch.manual_seed(0)
    model = LMRC(ModelConfig(backbone="efficientnet_lite0", setting=setting), pretrained_backbone=False)
    set_train_mode(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    t_max = max(frame_counts)
    images = torch.rand(batch, t_max, 3, size, size)
    masks = (torch.rand(batch, t_max, 2, size // 16, size // 16) > 0.7).float()
    masks = torch.nn.functional.interpolate(masks.flatten(0, 1), size=(size, size)).view(batch, t_max, 2, size, size)
    valid = torch.ones(batch, 2, dtype=torch.bool)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}; lmrc-lite {setting}, "
          f"batch {batch}, {size}x{size}")
    # Interleaved (one step of each variant in turn), so a change of load on a shared machine hits all alike.
    variants = [(p, t) for p in precisions for t in frame_counts]
    times: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
    for i in range(steps + 1):
        for precision, t in variants:
            dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                out = clip_forward(model, images[:, :t], masks[:, 0], valid, mem_every=5)
            loss = sum(o.agg_logits.float().logsumexp(1).mean() for o in out.outputs)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:  # the first step of each variant warms up allocators and kernels
                times[(precision, t)].append(time.perf_counter() - start)
    for (precision, t), ts in times.items():
        print(f"{precision}, {t} frames: {sum(ts) / len(ts):.2f} s/step (min {min(ts):.2f}, {len(ts)} steps)")
    print(f"load at the end {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
