"""Seconds per training step of lmrc-lite (forward + backward + Adam), fp32 and bf16 autocast side by side.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/train_step.py   # 3-frame paper sample, batch 4, 256x256
    FRAMES=8 STEPS=3 PYTHONPATH=. python benchmarks/train_step.py  # an 8-frame clip (lmrc.train.clip_pass)
    PRECISIONS=fp32 PYTHONPATH=. python benchmarks/train_step.py

Random inputs (the data loader is not timed). Prints the CPU model so every figure says where it came from.
"""
from __future__ import annotations

import os
import platform
import time

import torch

from lmrc.config import ModelConfig
from lmrc.model.network import LMRC
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
    frames = int(os.environ.get("FRAMES", "3"))
    steps = int(os.environ.get("STEPS", "4"))
    batch = int(os.environ.get("BATCH", "4"))
    size = int(os.environ.get("SIZE", "256"))
    setting = os.environ.get("SETTING", "F")
    precisions = os.environ.get("PRECISIONS", "fp32,bf16").split(",")
    torch.manual_seed(0)
    model = LMRC(ModelConfig(backbone="efficientnet_lite0", setting=setting), pretrained_backbone=False)
    set_train_mode(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    images = torch.rand(batch, frames, 3, size, size)
    masks = (torch.rand(batch, frames, 2, size // 16, size // 16) > 0.7).float()
    masks = torch.nn.functional.interpolate(masks.flatten(0, 1), size=(size, size)).view(batch, frames, 2, size, size)
    valid = torch.ones(batch, 2, dtype=torch.bool)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}; lmrc-lite {setting}, "
          f"batch {batch}, {frames} frames, {size}x{size}")
    for precision in precisions:
        dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
        times = []
        for i in range(steps + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                if frames == 3:
                    out = model(images, masks[:, 0], valid)
                    logits = [out.local_frame.agg_logits, out.query_frame.agg_logits]
                else:
                    from lmrc.train.clip_pass import clip_forward

                    logits = [o.agg_logits for o in clip_forward(model, images, masks[:, 0], valid).outputs]
            loss = sum(l.float().logsumexp(1).mean() for l in logits)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:  # the first step warms up allocators and kernels
                times.append(time.perf_counter() - start)
        print(f"{precision}: {sum(times) / len(times):.2f} s/step (min {min(times):.2f}, {len(times)} steps)", flush=True)


if __name__ == "__main__":
    main()
