"""lmrc-lite's two value encoders side by side: the first (image and masks, 3x3 fusion: the layout of older weights
files) and the current one (masks alone, 1x1 fusion), each in settings A and F, alternating per frame in one process.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/value_path.py [--precision fp32|bf16] [--frames 20] [--warmup 5]

Prints ms per frame (mean over the frames after the warm-up), the value-encoding stage, and F/A for each encoder.
Random weights, 480p synthetic video with 2 objects (`lmrc bench`'s), the inference fast path.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from lmrc.config import model_config
from lmrc.eval.bench import cpu_description, measure, synthetic_video
from lmrc.inference.segmenter import Segmenter
from lmrc.model.network import LMRC

ENCODERS = {"first": dict(value_trunk="image_and_mask", value_fusion_kernel=3), "current": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    segmenters = {}
    for encoder, fields in ENCODERS.items():
        for setting in ("A", "F"):
            torch.manual_seed(0)
            model = LMRC(model_config("lmrc-lite", setting=setting, **fields), pretrained_backbone=False).eval()
            segmenters[f"{encoder} {setting}"] = Segmenter(model, precision=args.precision, device="cpu")
    runs = measure(segmenters, synthetic_video(args.frames), args.warmup)
    cpu = cpu_description()
    print(f"cpu: {cpu}; precision {args.precision}; threads {torch.get_num_threads()}; "
          f"{args.frames} frames, means over the last {args.frames - args.warmup}")
    means = {}
    for label, run in runs.items():
        kept = slice(args.warmup, None)
        means[label] = 1000 * statistics.fmean(run.totals[kept])
        value = 1000 * statistics.fmean(t.get("value_encoding", 0.0) for t in run.stages[kept])
        print(f"{label:10s} {means[label]:8.1f} ms/frame ({1000 / means[label]:5.2f} frames/s), value encoding "
              f"{value:6.1f} ms")
    for encoder in ENCODERS:
        print(f"F/A with the {encoder} value encoder: {means[f'{encoder} F'] / means[f'{encoder} A']:.3f}")


if __name__ == "__main__":
    main()
