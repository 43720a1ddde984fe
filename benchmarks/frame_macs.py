"""Multiply-adds of one streaming frame (the 4th, not a memory frame) per model and setting, counted by
torch.utils.flop_counter.FlopCounterMode on `Segmenter.step` at 480p with 2 objects:

    .venv/bin/python benchmarks/frame_macs.py
"""
import torch
from torch.utils.flop_counter import FlopCounterMode
from lmrc.eval.bench import build_model, synthetic_video
from lmrc.inference.segmenter import Segmenter
torch.set_num_threads(2)
for name in ("lmrc-lite", "lmrc-r50"):
    for setting in ("A", "F"):
        seg = Segmenter(build_model(name, setting, None, None), size=480)
        frames = list(synthetic_video(4))
        for rgb, mask in frames[:3]: seg.step(rgb, mask)
        with FlopCounterMode(display=False) as fc:
            seg.step(*frames[3])
        counts = fc.get_flop_counts()
        total = fc.get_total_flops()
        conv = sum(v for k, v in counts.get("Global", {}).items() if "conv" in str(k))
        print(name, setting, f"total {total/2e9:.2f} GMAC, convolutions {conv/2e9:.2f} GMAC")
