"""YouTube-VOS validation: read `meta.json`, find where each object starts, pack a submission zip.

Layout of a valid root: `meta.json`, `JPEGImages/<video>/<frame>.jpg` (every 5th frame in `valid`, all frames in
`valid_all_frames`), `Annotations/<video>/<frame>.png` (each object's mask on the frame where it first appears).
The server scores exactly the frames present in `JPEGImages`; the zip holds `Annotations/<video>/<frame>.png`
at its root.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from lmrc.data.masks import read_mask, write_mask
from lmrc.utils.errors import LmrcError
from lmrc.fileio import atomic_path

SUBMISSION_NAME = "submission.zip"


def read_meta(valid_root: str | Path) -> dict[str, dict[int, dict]]:
    """{video: {object id: {"category": str, "frames": [frame, ...]}}} from `<valid_root>/meta.json`."""
    path = Path(valid_root) / "meta.json"
    try:
        meta = json.loads(path.read_text())
        videos = meta["videos"]
        return {video: {int(k): v for k, v in info["objects"].items()} for video, info in videos.items()}
    except FileNotFoundError:
        raise LmrcError(
            f"{path} not found; pass the YouTube-VOS valid folder (holding meta.json, JPEGImages/)"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise LmrcError(
            f"{path} is not a YouTube-VOS meta file ({type(exc).__name__}: {exc}); expected "
            '{"videos": {video: {"objects": {"1": {"category": ..., "frames": [...]}}}}}'
        ) from None


def benchmark_frames(valid_root: str | Path, video: str) -> list[str]:
    """Frame names (no extension) the benchmark scores for `video`: those in `JPEGImages/<video>/`, sorted."""
    folder = Path(valid_root) / "JPEGImages" / video
    frames = sorted(p.stem for p in folder.glob("*.jpg")) if folder.is_dir() else []
    if not frames:
        raise LmrcError(f"{folder} holds no .jpg frames; pass the YouTube-VOS valid folder with its JPEGImages/")
    return frames


def first_frames(valid_root: str | Path) -> dict[str, dict[int, str]]:
    """{video: {object id: first frame name}}: where each object of meta.json first appears in `Annotations/`.

    The engine starts an object's memory at that frame (YouTube-VOS objects may enter mid-video).
    """
    root = Path(valid_root)
    starts: dict[str, dict[int, str]] = {}
    for video, objects in read_meta(root).items():
        folder = root / "Annotations" / video
        found: dict[int, str] = {}
        for path in sorted(folder.glob("*.png")):
            for obj in np.unique(read_mask(path)).tolist():
                if obj in objects and obj not in found:
                    found[obj] = path.stem
            if len(found) == len(objects):
                break
        absent = sorted(set(objects) - set(found))
        if absent:
            raise LmrcError(
                f"object {absent[0]} of video {video} (meta.json) appears in no mask of {folder}; "
                "use the Annotations folder that came with this meta.json"
            )
        starts[video] = dict(sorted(found.items(), key=lambda item: (item[1], item[0])))
    return starts


def segment_videos(model, valid_root: str | Path, predictions: str | Path, **segmenter_options) -> int:
    """Segment every video of meta.json into `predictions/<video>/<frame>.png`; returns the frames written.

    model: a model, or a Segmenter to use; segmenter_options: for `Segmenter` (an InferenceConfig as `config`, or its
    fields).
    Each video's `Annotations/<video>/` holds sparse masks: an object's memory starts at the frame where its
    mask is given and frames before it leave it out (no backward propagation), as the benchmark asks. Every frame
    present in `JPEGImages/<video>` is segmented.
    """
    from lmrc.inference.run import segment_sequence
    from lmrc.inference.segmenter import Segmenter

    root, predictions = Path(valid_root), Path(predictions)
    # one inference copy for every video
    segmenter = model if isinstance(model, Segmenter) else Segmenter(model, **segmenter_options)
    frames = 0
    for video in read_meta(root):
        frames += segment_sequence(
            segmenter, root / "JPEGImages" / video, root / "Annotations" / video, predictions / video, overwrite=True,
            backward=False,
        ).frames
    return frames


def prepare_submission(
    predictions: str | Path, valid_root: str | Path, out_dir: str | Path, *, all_frames: bool = False
) -> Path:
    """Select the scored frames of every video, write `out_dir/Annotations/<video>/<frame>.png` and
    `out_dir/submission.zip`; returns the zip path.

    predictions: folder of `<video>/<frame>.png` (palette or 0/255). Default: the frames of `JPEGImages/<video>`;
    `all_frames`: every predicted frame (for valid_all_frames), which must still include those.
    Both outputs appear only when complete; an older `Annotations/` and zip are replaced.
    """
    predictions, out_dir = Path(predictions), Path(out_dir)
    if not predictions.is_dir():
        raise LmrcError(f"predictions folder {predictions} not found; pass the folder holding <video>/<frame>.png")
    meta = read_meta(valid_root)
    if not meta:
        raise LmrcError(f"{Path(valid_root) / 'meta.json'} lists no videos; pass the YouTube-VOS valid folder")
    plan: list[tuple[str, str, Path, tuple[int, int], int]] = []  # (video, frame, prediction, (W, H), max id)
    for video, objects in meta.items():
        wanted = benchmark_frames(valid_root, video)
        pred_dir = predictions / video
        have = {p.stem for p in pred_dir.glob("*.png")} if pred_dir.is_dir() else set()
        missing = [f for f in wanted if f not in have]
        if missing:
            raise LmrcError(
                f"prediction {pred_dir / (missing[0] + '.png')} is missing ({len(missing)} of {len(wanted)} "
                f"scored frames of {video} absent); segment every video listed in meta.json"
            )
        with Image.open(Path(valid_root) / "JPEGImages" / video / f"{wanted[0]}.jpg") as image:
            size = image.size  # header only: W, H
        for frame in sorted(have) if all_frames else wanted:
            plan.append((video, frame, pred_dir / f"{frame}.png", size, max(objects, default=0)))

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".submission.", dir=out_dir))
    try:
        for video, frame, path, (w, h), max_id in plan:
            ids = read_mask(path)
            if ids.shape != (h, w):
                raise LmrcError(
                    f"prediction {path} is {ids.shape[1]}x{ids.shape[0]} but the video's frames are {w}x{h}; "
                    "write masks at the frame size"
                )
            if ids.max(initial=0) > max_id:
                raise LmrcError(f"prediction {path} has object id {int(ids.max())}; meta.json lists ids up to {max_id}")
            write_mask(staging / "Annotations" / video / f"{frame}.png", ids)
        zip_path = out_dir / SUBMISSION_NAME
        with atomic_path(zip_path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for video, frame, *_ in plan:
                archive.write(staging / "Annotations" / video / f"{frame}.png", f"Annotations/{video}/{frame}.png")
        target = out_dir / "Annotations"
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging / "Annotations", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return zip_path
