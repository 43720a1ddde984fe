"""Mask quality of `lmrc.inference.prompts.mask_from_prompts` (GrabCut seeded by prompts) against ground truth, as an
interactive user would work: a box = the true mask's bounding box grown by MARGIN pixels, then up to 3 clicks, each
placed automatically at the deepest point of the largest error region (positive where the object was missed,
negative where background was taken; `next_click`); each call gets the box and all clicks so far (0.767 against
0.742 when each click refined the previous mask instead, on a third of these frames).

Frames (fixed list): DAVIS 2016 frames 00000 and 00040 of its 23 sequences (854x480), and every 10th SOD image
by name (30 images, 481x321). Mean IoU per set after the box alone and after each click, and mean seconds per call.

    .venv/bin/python benchmarks/prompts.py            # DATA=/path/to/shared/data to point elsewhere
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lmrc.data.masks import read_mask
from lmrc.inference.prompts import box_around, mask_from_prompts, next_click

MARGIN = 5
CLICKS = 3
DAVIS_FRAMES = ("00000", "00040")


def data_root() -> Path:
    if os.environ.get("DATA"):
        return Path(os.environ["DATA"])
    for parent in Path(__file__).resolve().parents[1:4]:  # beside the repository, or beside its worktrees folder
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def frames(root: Path) -> dict[str, list[tuple[str, Path, Path]]]:
    davis = root / "davis2016"
    sets: dict[str, list[tuple[str, Path, Path]]] = {"DAVIS 2016": [], "SOD": []}
    for seq in sorted(p.name for p in (davis / "JPEGImages" / "480p").iterdir() if p.is_dir()):
        for name in DAVIS_FRAMES:
            image = davis / "JPEGImages" / "480p" / seq / f"{name}.jpg"
            if image.exists():
                truth = davis / "Annotations" / "480p" / seq / f"{name}.png"
                sets["DAVIS 2016"].append((f"{seq}/{name}", image, truth))
    sod = root / "sod"
    for image in sorted((sod / "images").glob("*.jpg"))[::10]:
        sets["SOD"].append((image.stem, image, sod / "masks" / f"{image.stem}.png"))
    return sets


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def run_one(image: np.ndarray, truth: np.ndarray) -> tuple[list[float], list[float]]:
    """IoU after the box and after each click; seconds of each call."""
    box = box_around(truth, MARGIN)
    start = time.perf_counter()
    mask = mask_from_prompts(image, box=box)
    seconds = [time.perf_counter() - start]
    scores = [iou(mask, truth)]
    points = []
    for _ in range(CLICKS):
        click = next_click(mask, truth)
        if click is None:  # already exact
            scores.append(scores[-1])
            continue
        points.append(click)
        start = time.perf_counter()
        mask = mask_from_prompts(image, box=box, points=points)  # box + all clicks so far (beat refining `previous`)
        seconds.append(time.perf_counter() - start)
        scores.append(iou(mask, truth))
    return scores, seconds


def main() -> int:
    root = data_root()
    if not (root / "davis2016").is_dir() or not (root / "sod").is_dir():
        print(f"data not found at {root} (needs davis2016 and sod); set DATA=/path/to/shared/data", file=sys.stderr)
        return 1
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    print(f"CPU: {cpu}; box = true bounding box + {MARGIN} px; clicks at the largest error; "
          "each call gets the box and all clicks so far")
    header = "| set | frames | box | + 1 click | + 2 clicks | + 3 clicks | s / call |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    worst: list[tuple[float, str]] = []
    for name, items in frames(root).items():
        table, times = [], []
        for label, image_path, mask_path in items:
            image = np.asarray(Image.open(image_path).convert("RGB"))
            truth = read_mask(mask_path) > 0
            scores, seconds = run_one(image, truth)
            table.append(scores)
            times.extend(seconds)
            worst.append((scores[-1], f"{name} {label}"))
        mean = np.mean(table, axis=0)
        print(f"| {name} | {len(items)} | " + " | ".join(f"{v:.3f}" for v in mean) + f" | {np.mean(times):.2f} |")
    worst.sort()
    print("lowest after 3 clicks: " + ", ".join(f"{label} {score:.2f}" for score, label in worst[:5]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
