"""Tiny generated DAVIS-2016-style datasets and configs for the training tests (seconds on a CPU)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image


def make_tiny_davis2016(root: Path, sequences: int = 3, frames: int = 6, size: tuple[int, int] = (72, 96)) -> Path:
    """A square moving over a textured background; masks 0/255; ImageSets/480p/train.txt lists every pair."""
    h, w = size
    lines = []
    rng = np.random.default_rng(0)
    for s in range(sequences):
        name = f"seq{s}"
        (root / "JPEGImages" / "480p" / name).mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / "480p" / name).mkdir(parents=True, exist_ok=True)
        background = rng.integers(0, 120, size=(h, w, 3), dtype=np.uint8)
        colour = np.array([200, 60 + 60 * s, 40], dtype=np.uint8)
        for t in range(frames):
            image = background.copy()
            mask = np.zeros((h, w), dtype=np.uint8)
            y, x = 10 + 3 * t, 12 + 4 * t + 5 * s
            image[y:y + 28, x:x + 30] = colour
            mask[y:y + 28, x:x + 30] = 255
            Image.fromarray(image).save(root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", quality=95)
            Image.fromarray(mask).save(root / "Annotations" / "480p" / name / f"{t:05d}.png")
            lines.append(f"/JPEGImages/480p/{name}/{t:05d}.jpg /Annotations/480p/{name}/{t:05d}.png")
    (root / "ImageSets" / "480p").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "480p" / "train.txt").write_text("\n".join(lines) + "\n")
    return root


def tiny_config(data_root: Path, **sections) -> dict:
    """A config dict for 64x64 crops, batch 2, lmrc-lite without the ImageNet download, no validation."""
    cfg = {
        "model": {"backbone": "efficientnet_lite0", "setting": "F"},
        "data": {
            "datasets": [{"kind": "davis2016", "root": str(data_root), "split": "train"}],
            "holdout": [],
            "crop_size": [64, 64],
            "max_short_side": None,
            "max_gap": 3,
            "workers": 0,
        },
        "optim": {"lr": 1e-3, "iterations": 6, "batch_size": 2, "precision": "fp32", "grad_clip": 1.0},
        "loss": {"ce": "plain", "scale_loss_iterations": 2},
        "logging": {"every": 1, "checkpoint_every": 2, "val_every": 0, "tensorboard": False, "progress_bar": False},
        "init": {"pretrained_backbone": False},
        "seed": 0,
    }
    for name, value in sections.items():
        cfg[name] = {**cfg.get(name, {}), **value} if isinstance(value, dict) else value
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path
