"""The memory comparator's reliability maps H (eq. 10, the paper's Fig. 7) on a DAVIS sequence, as one PNG.

    .venv/bin/python docs/figures/reliability_maps.py dance-jump 20,45 docs/figures/reliability-dance-jump.jpg

Each row is one frame: the frame with the predicted mask (red) and the true one (green outline), then H of each
local read (L4, L3, L2, S3, S2): red where the model trusts its local read of the previous frame, blue where it
leans on the global memory. Frames are segmented from the first frame's true mask, with the shipped weights
(`--weights` for others), at 480 px, fp32.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

import lmrc
from lmrc.data.masks import read_mask
from lmrc.data.video import open_frames

DAVIS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "davis2016"
TILE_H = 150


def _tile(image: np.ndarray, label: str) -> np.ndarray:
    h, w = image.shape[:2]
    tile = cv2.resize(image, (round(w * TILE_H / h), TILE_H), interpolation=cv2.INTER_AREA)
    cv2.putText(tile, label, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2, cv2.LINE_AA)
    return tile


def _overlay(rgb: np.ndarray, ids: np.ndarray, truth: np.ndarray) -> np.ndarray:
    out = rgb.copy()
    out[ids > 0] = (0.5 * out[ids > 0] + [127, 0, 0]).astype(np.uint8)
    contours, _ = cv2.findContours((truth > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, (0, 255, 0), 2)
    return out


def _heat(h: np.ndarray) -> np.ndarray:
    coloured = cv2.applyColorMap((np.clip(h, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.cvtColor(coloured, cv2.COLOR_BGR2RGB)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sequence")
    parser.add_argument("frames", help="comma-separated frame indices to show")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--davis", default=str(DAVIS), help="DAVIS 2016 root (JPEGImages/, Annotations/)")
    parser.add_argument("--weights", help="lmrc-lite weights (default: the shipped file)")
    args = parser.parse_args(argv)
    shown = sorted(int(i) for i in args.frames.split(","))
    root = Path(args.davis)
    masks = sorted((root / "Annotations" / "480p" / args.sequence).glob("*.png"))
    if not masks:
        print(f"no masks for {args.sequence} under {root}", file=sys.stderr)
        return 2
    seg = lmrc.Segmenter(lmrc.load_model("lmrc-lite", args.weights), lmrc.InferenceConfig(precision="fp32"))
    rows = []
    for frame in open_frames(root / "JPEGImages" / "480p" / args.sequence):
        first = (read_mask(masks[0]) > 0).astype(np.uint8) if frame.index == 0 else None
        probs = seg.step(frame.rgb, first)
        if frame.index in shown:
            truth = read_mask(masks[frame.index])
            tiles = [_tile(_overlay(frame.rgb, seg.probs_to_ids(probs), truth), f"frame {frame.index}")]
            tiles += [_tile(_heat(h.cpu().numpy()), f"H {name}") for name, h in seg.reliability.items()]
            rows.append(np.concatenate(tiles, 1))
        if frame.index >= shown[-1]:
            break
    width = max(row.shape[1] for row in rows)
    rows = [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0))) for row in rows]
    cv2.imwrite(args.out, cv2.cvtColor(np.concatenate(rows, 0), cv2.COLOR_RGB2BGR))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
