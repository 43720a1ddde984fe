"""`lmrc baseline copy|flow`: reference points a learned model must beat.

- copy: the first-frame mask, unchanged, for every frame.
- flow: the previous predicted mask warped by dense optical flow. The flow is computed from the current frame to
  the previous one and used for backward warping (each current pixel takes the id at the point it came from,
  nearest neighbour, so ids are never blended); pixels that come from outside the image become background.

Single video: `lmrc baseline flow FRAMES_DIR --mask first.png --out OUT` writes `OUT/<frame>.png`.
Dataset: `lmrc baseline flow --gt DAVIS_ROOT [--split val] [--sequences a,b] --out OUT` writes
`OUT/<seq>/<frame>.png` for every sequence, ready for `lmrc eval --results OUT --gt DAVIS_ROOT`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np

from lmrc.data.masks import read_mask, write_mask
from lmrc.utils.errors import LmrcError

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
METHODS = ("copy", "flow")
FLOW_ESTIMATORS = ("dis", "farneback")


def list_frames(folder: str | Path) -> list[Path]:
    """Sorted jpg/jpeg/png frames of a folder; refuses a missing or empty one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LmrcError(f"frame folder {folder} not found; pass a folder of numbered .jpg/.png frames")
    frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and not p.name.startswith("."))
    if not frames:
        raise LmrcError(f"frame folder {folder} holds no .jpg/.png frames; pass the folder of the video's frames")
    return frames


def read_gray(path: Path) -> np.ndarray:
    """H x W uint8 luminance of a frame."""
    gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise LmrcError(f"frame {path} cannot be read as an image; re-export it as .jpg or .png")
    return gray


def flow_estimator(name: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A function (source H x W uint8, target H x W uint8) -> H x W x 2 float32 flow, source pixel -> target."""
    if name == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        return lambda source, target: dis.calc(source, target, None)
    if name == "farneback":
        return lambda source, target: cv2.calcOpticalFlowFarneback(source, target, None, 0.5, 4, 21, 3, 5, 1.1, 0)
    raise LmrcError(f"unknown flow estimator '{name}'; use one of {', '.join(FLOW_ESTIMATORS)}")


def warp_backward(prev_ids: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """ids_t(x) = ids_{t-1}(x + flow(x)), nearest neighbour, background outside the image.

    prev_ids: H x W uint8; flow: H x W x 2 (dx, dy), from the current frame to the previous one.
    """
    h, w = prev_ids.shape
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(
        prev_ids, grid_x + flow[..., 0], grid_y + flow[..., 1], cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def propagate(method: str, frames: list[Path], first_mask: np.ndarray, flow: str = "dis") -> Iterator[np.ndarray]:
    """Yield one H x W uint8 id mask per frame (the first is `first_mask` itself)."""
    if method not in METHODS:
        raise LmrcError(f"unknown baseline '{method}'; use one of {', '.join(METHODS)}")
    yield first_mask
    if method == "copy":
        for _ in frames[1:]:
            yield first_mask
        return
    estimate = flow_estimator(flow)
    prev_gray, ids = read_gray(frames[0]), first_mask
    for path in frames[1:]:
        gray = read_gray(path)
        if gray.shape != prev_gray.shape:
            raise LmrcError(f"frame {path} is {gray.shape[1]}x{gray.shape[0]}, unlike the frames before it; "
                            "resize the video's frames to one size")
        ids = warp_backward(ids, estimate(gray, prev_gray))
        prev_gray = gray
        yield ids


def run_video(
    method: str, frames_dir: str | Path, mask_path: str | Path, out_dir: str | Path, flow: str = "dis"
) -> int:
    """Segment one frame folder from its first-frame mask into `out_dir/<frame>.png`; returns the frame count.

    The folder is written beside `out_dir` under a temporary name and moved into place only when complete.
    """
    frames = list_frames(frames_dir)
    first_mask = read_mask(mask_path)
    h, w = read_gray(frames[0]).shape
    if first_mask.shape != (h, w):
        raise LmrcError(
            f"mask {mask_path} is {first_mask.shape[1]}x{first_mask.shape[0]} but frame {frames[0]} is {w}x{h}; "
            "give the mask of the first frame at the frame's size"
        )
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        for path, ids in zip(frames, propagate(method, frames, first_mask, flow)):
            write_mask(staging / f"{path.stem}.png", ids)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return len(frames)


def _check_replaceable(out_dir: Path) -> None:
    # Only a folder of masks (a previous run) is replaced; anything else is the user's and is left alone.
    if out_dir.exists():
        if not out_dir.is_dir():
            raise LmrcError(f"output {out_dir} exists and is not a folder; choose another --out")
        foreign = [p for p in out_dir.iterdir() if p.suffix.lower() != ".png"]
        if foreign:
            raise LmrcError(
                f"output folder {out_dir} holds files other than masks ({foreign[0].name}); choose an empty --out"
            )


def run_dataset(
    method: str,
    gt_root: str | Path,
    sequences: list[str],
    out_dir: str | Path,
    flow: str = "dis",
    workers: int | None = None,
    progress: Callable[[str, int, int, int], None] | None = None,
) -> int:
    """Run the baseline on every listed DAVIS sequence into `out_dir/<seq>/`; returns the total frame count."""
    from lmrc.eval.davis import RESOLUTION, available_cores, gt_frames

    gt_root, out_dir = Path(gt_root), Path(out_dir)
    jobs = []
    for seq in sequences:
        frames_dir = gt_root / "JPEGImages" / RESOLUTION / seq
        jobs.append((method, str(frames_dir), str(gt_frames(gt_root, seq)[0]), str(out_dir / seq), flow))
        list_frames(frames_dir)  # refuse a missing sequence before any work starts
    workers = min(len(jobs), available_cores() if workers is None else max(1, workers))
    total = 0
    if workers <= 1:
        for i, job in enumerate(jobs):
            n = run_video(*job)
            total += n
            if progress:
                progress(Path(job[3]).name, n, i + 1, len(jobs))
        return total
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(run_video, *job): Path(job[3]).name for job in jobs}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            n = future.result()
            total += n
            if progress:
                progress(futures[future], n, done, len(jobs))
    return total


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", choices=METHODS, help="copy: first mask everywhere; flow: optical-flow propagation")
    parser.add_argument("input", nargs="?", help="folder of the video's frames (.jpg/.png); omit with --gt")
    parser.add_argument("--mask", help="first-frame mask (palette or 0/255 PNG), with INPUT")
    parser.add_argument("--gt", help="DAVIS root: run every sequence of --split (or of --sequences)")
    parser.add_argument("--split", default="val", help="DAVIS split with --gt (default: val)")
    parser.add_argument("--year", type=int, choices=(2016, 2017), help="DAVIS year with --gt (default: detected)")
    parser.add_argument("--sequences", help="comma-separated sequences with --gt (default: the whole split)")
    parser.add_argument("--out", required=True, help="output folder (INPUT: <frame>.png; --gt: <seq>/<frame>.png)")
    parser.add_argument("--flow", choices=FLOW_ESTIMATORS, default="dis", help="optical flow (default: dis)")
    parser.add_argument("--workers", type=int, help="parallel sequences with --gt (default: available cores)")


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.gt:
        if args.input or args.mask:
            raise LmrcError("give either INPUT --mask FIRST_MASK (one video) or --gt DAVIS_ROOT (a dataset), not both")
        from lmrc.eval.davis import detect_year, split_sequences

        wanted = [s for s in (args.sequences or "").split(",") if s]
        if not wanted:
            year = args.year or detect_year(args.gt, args.split)
            wanted = split_sequences(args.gt, args.split, year)
        frames = run_dataset(
            args.method, args.gt, wanted, args.out, args.flow, args.workers,
            progress=lambda seq, n, i, total: print(f"[{i}/{total}] {seq}: {n} frames", flush=True),
        )
    else:
        if not args.input or not args.mask:
            raise LmrcError("give INPUT (a folder of frames) and --mask FIRST_MASK, or --gt DAVIS_ROOT")
        frames = run_video(args.method, args.input, args.mask, args.out, args.flow)
    seconds = time.perf_counter() - start
    rate = frames / max(seconds, 1e-9)
    print(f"{args.method} baseline: {frames} frames in {seconds:.1f} s ({rate:.1f} frames/s) -> {args.out}")
    return 0
