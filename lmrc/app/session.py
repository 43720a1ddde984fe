"""One browser tab's work in `lmrc app`: its video (decoded once to a cache folder), objects, prompts and results.

Everything a session holds on disk lives in one temporary folder, removed by `close()`:

    frames/00000.jpg ...    the video's frames, decoded once when it is opened (JPEG, quality 95)
    masks/00000.png ...     the current object ids of each frame (DAVIS palette), prompted or propagated
    reliability/00000.npz   the comparator's reliability maps H (eq. 10) of each propagated frame, uint8 at the
                            processing size, one array per readout (L4, L3, L2, S3, S2)
    upload/, exports/       uploaded files, built zips and videos

Only the frame on screen and the frame being segmented are in memory. Long work (opening, propagating,
exporting) runs as a `Job` in a background thread that the page polls and can cancel.

A frame the user edits becomes a prompt: its whole mask, as shown, is given to the segmenter there, so a
correction made after a propagation steers the next one.
"""
from __future__ import annotations

import io
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from lmrc.data.masks import davis_palette, write_mask
from lmrc.data.video import DEFAULT_FPS, open_frames
from lmrc.utils.errors import LmrcError
from lmrc.fileio import atomic_path

JPEG_QUALITY = 95
MAX_OBJECTS = 20


@dataclass(frozen=True)
class Limits:
    """What one session accepts: frames per video, pixels per frame, bytes per upload."""

    max_frames: int = 1000
    max_pixels: int = 1920 * 1080
    max_upload_bytes: int = 2 << 30

    def describe(self) -> str:
        return f"at most {self.max_frames} frames of at most {self.max_pixels / 1e6:.1f} megapixels each"


@dataclass
class Job:
    """Background work the page follows: `done` of `total` steps, its rate, how it ended, and its result."""

    kind: str
    total: int
    done: int = 0
    number: int = 0  # the n-th job of its session, so the page can tell a new job from the last one
    state: str = "running"  # running | done | cancelled | error
    message: str = ""
    result: str | None = None  # a download name, for exports
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def as_dict(self) -> dict:
        elapsed = (self.finished or time.monotonic()) - self.started
        return {"kind": self.kind, "number": self.number, "total": self.total, "done": self.done, "state": self.state,
                "message": self.message, "result": self.result,
                "rate": round(self.done / elapsed, 2) if elapsed > 0 and self.done else 0.0}


@dataclass
class Video:
    name: str  # the sequence name used in exports
    frames: int
    width: int
    height: int
    fps: float
    frame_names: list[str]


@dataclass
class Edit:
    """The prompts of one object on one frame, kept so that each new click refines the same mask."""

    box: tuple[float, float, float, float] | None = None
    points: list[tuple[float, float, bool]] = field(default_factory=list)
    strokes: list[tuple[list[tuple[float, float]], float, bool]] = field(default_factory=list)
    previous: np.ndarray | None = None  # the object's mask on this frame before the edit began (e.g. propagated)


def paint_strokes(mask: np.ndarray, strokes) -> np.ndarray:
    """Brush and eraser are exact, as in a paint program: over GrabCut's mask (which they also seed), brushed pixels
    are the object and erased ones are not, later strokes over earlier ones. (GrabCut alone may drop a thin brushed
    strip that its colour model or its working size does not keep.)"""
    import cv2

    painted = mask.astype(np.uint8)
    for path, radius, positive in strokes:
        points = np.round(np.array(path, np.float64)).astype(np.int32).reshape(-1, 1, 2)
        thickness = max(1, int(round(2 * radius)))
        cv2.polylines(painted, [points], False, int(positive), thickness)
        for x, y in points[:, 0]:  # a single-point stroke is a dot
            cv2.circle(painted, (int(x), int(y)), max(1, int(round(radius))), int(positive), -1)
    return painted.astype(bool)


class Session:
    """State of one tab. `segment` runs the network: `segment(session, job, on_frame)` (see `lmrc.app.server`)."""

    def __init__(self, session_id: str, limits: Limits, root: str | Path | None = None) -> None:
        self.id = session_id
        self.limits = limits
        self.dir = Path(tempfile.mkdtemp(prefix=f"lmrc-app-{session_id[:8]}-", dir=root))
        self.lock = threading.RLock()
        self.video: Video | None = None
        self.objects: list[int] = []
        self.edits: dict[tuple[int, int], Edit] = {}
        self.prompt_frames: set[int] = set()
        self.job: Job | None = None
        self.generation = 0  # bumped when a new video is opened, so images are not served from the browser cache
        self.last_seen = time.monotonic()
        self.closed = False

    # --- folders ---------------------------------------------------------------------------------------------------

    def _sub(self, name: str) -> Path:
        path = self.dir / name
        path.mkdir(exist_ok=True)
        return path

    def frame_path(self, index: int) -> Path:
        return self.dir / "frames" / f"{index:05d}.jpg"

    def mask_path(self, index: int) -> Path:
        return self.dir / "masks" / f"{index:05d}.png"

    def reliability_path(self, index: int) -> Path:
        return self.dir / "reliability" / f"{index:05d}.npz"

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    # --- opening a video ---------------------------------------------------------------------------------------------

    def upload_path(self, name: str, folder: bool) -> Path:
        """Where an uploaded file goes: upload/<name> for a video, upload/frames/<name> for a folder's frames."""
        clean = Path(name.replace("\\", "/")).name
        if not clean or clean.startswith("."):
            raise LmrcError(f"upload {name!r} has no usable file name")
        base = self._sub("upload")
        if folder:
            base = base / "frames"
            base.mkdir(exist_ok=True)
        return base / clean

    def clear_uploads(self) -> None:
        shutil.rmtree(self.dir / "upload", ignore_errors=True)

    def open(self, path: str | Path) -> Job:
        """Check the video (readable, within the limits) now, then decode it to the cache in a background job."""
        path = Path(str(path).strip()).expanduser()
        source = open_frames(path)  # LmrcError: missing, not a video, no frames, ...
        limits = self.limits
        if source.num_frames is not None and source.num_frames > limits.max_frames:
            raise LmrcError(f"{path.name} has {source.num_frames} frames; this server takes {limits.describe()}. "
                            "Cut the video shorter (or start `lmrc app --max-frames N`)")
        h, w = source.size
        if h * w > limits.max_pixels:
            raise LmrcError(f"{path.name} is {w}x{h} ({h * w / 1e6:.1f} megapixels); this server takes "
                            f"{limits.describe()}. Scale the video down (or start `lmrc app --max-pixels N`)")
        with self.lock:
            self._check_idle()
            self.video = None
            self.objects, self.edits, self.prompt_frames = [], {}, set()
            self.generation += 1
            for name in ("frames", "masks", "reliability", "exports"):
                shutil.rmtree(self.dir / name, ignore_errors=True)
            frames_dir = self._sub("frames")
            self._sub("masks"), self._sub("reliability")
            job = Job("open", source.num_frames or 0)

        def decode() -> None:
            names: list[str] = []
            for frame in source:  # LmrcError names an unreadable frame
                if job.cancel.is_set():
                    return
                if len(names) >= limits.max_frames:
                    raise LmrcError(f"{path.name} has more than {limits.max_frames} frames; this server takes "
                                    f"{limits.describe()}. Cut the video shorter")
                Image.fromarray(frame.rgb).save(frames_dir / f"{len(names):05d}.jpg", quality=JPEG_QUALITY)
                names.append(frame.name)
                job.done = len(names)
                job.total = max(job.total, job.done)
            with self.lock:
                self.video = Video(source.sequence, len(names), w, h, source.fps or DEFAULT_FPS, names)
            job.message = f"opened {path.name}: {len(names)} frames, {w}x{h}"

        self._start(job, decode)
        return job

    # --- frames and masks -------------------------------------------------------------------------------------------

    def _video(self) -> Video:
        if self.video is None:
            raise LmrcError("no video is open: open a video file or a folder of frames first")
        return self.video

    def _frame_index(self, index: int) -> int:
        video = self._video()
        if not 0 <= index < video.frames:
            raise LmrcError(f"frame {index} does not exist: the video has frames 0 to {video.frames - 1}")
        return index

    def frame_rgb(self, index: int) -> np.ndarray:
        path = self.frame_path(self._frame_index(index))
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))

    def ids(self, index: int) -> np.ndarray | None:
        """The object ids of a frame (H x W uint8), or None before anything was segmented there."""
        path = self.mask_path(self._frame_index(index))
        if not path.exists():
            return None
        with Image.open(path) as image:
            return np.array(image)

    def write_ids(self, index: int, ids: np.ndarray) -> None:
        write_mask(self.mask_path(index), ids)

    # --- objects and prompts ----------------------------------------------------------------------------------------

    def add_object(self) -> int:
        with self.lock:
            self._video()
            self._check_idle()
            if len(self.objects) >= MAX_OBJECTS:
                raise LmrcError(f"at most {MAX_OBJECTS} objects per video")
            object_id = max(self.objects, default=0) + 1
            self.objects.append(object_id)
            return object_id

    def _object(self, object_id: int) -> int:
        if object_id not in self.objects:
            raise LmrcError(f"object {object_id} does not exist; add an object first")
        return object_id

    def prompt(self, index: int, object_id: int, *, box=None, point=None, stroke=None) -> np.ndarray:
        """Add one prompt (a box replaces the previous box) to `object_id` on frame `index` and remake its mask there.
        Returns the frame's new ids. The frame becomes a prompt frame."""
        with self.lock:
            self._check_idle()
            index, object_id = self._frame_index(index), self._object(object_id)
            video = self._video()
            ids = self.ids(index)
            if ids is None:
                ids = np.zeros((video.height, video.width), np.uint8)
            edit = self.edits.get((index, object_id))
            if edit is None:
                current = ids == object_id
                edit = Edit(previous=current if current.any() else None)
            new = Edit(edit.box, list(edit.points), list(edit.strokes), edit.previous)
            if box is not None:
                new.box = tuple(float(v) for v in box)
                new.previous = None  # a new box starts the object over
            if point is not None:
                x, y, positive = point
                new.points.append((float(x), float(y), bool(positive)))
            if stroke is not None:
                path, radius, positive = stroke
                new.strokes.append(([(float(x), float(y)) for x, y in path], float(radius), bool(positive)))
            mask = self._mask_from_prompts(index, new)
            ids = np.where(ids == object_id, 0, ids).astype(np.uint8)
            ids[mask] = object_id
            self.write_ids(index, ids)
            self.edits[(index, object_id)] = new
            self.prompt_frames.add(index)
            return ids

    def _mask_from_prompts(self, index: int, edit: Edit) -> np.ndarray:
        from lmrc.inference.prompts import mask_from_prompts  # GrabCut at a working size: about 1 s a click

        mask = mask_from_prompts(self.frame_rgb(index), box=edit.box, points=edit.points, strokes=edit.strokes,
                                 previous=edit.previous)
        return paint_strokes(mask, edit.strokes)

    def clear(self, index: int, object_id: int) -> None:
        """Remove `object_id` from frame `index` and forget its prompts there."""
        with self.lock:
            self._check_idle()
            index, object_id = self._frame_index(index), self._object(object_id)
            self.edits.pop((index, object_id), None)
            ids = self.ids(index)
            if ids is None:
                return
            ids = np.where(ids == object_id, 0, ids).astype(np.uint8)
            self.write_ids(index, ids)
            if not ids.any():
                self.prompt_frames.discard(index)

    def prompts(self) -> dict[int, np.ndarray]:
        """The prompt frames' ids, {frame index: H x W uint8}; frames whose objects were all erased are left out."""
        masks = {}
        for index in sorted(self.prompt_frames):
            ids = self.ids(index)
            if ids is not None and ids.any():
                masks[index] = ids
        return masks

    # --- background jobs -------------------------------------------------------------------------------------------

    def _check_idle(self) -> None:
        if self.job is not None and self.job.state == "running":
            raise LmrcError(f"wait for the {self.job.kind} to finish, or cancel it")

    def _start(self, job: Job, work: Callable[[], None]) -> None:
        def run() -> None:
            try:
                work()
                if job.cancel.is_set():
                    job.state, job.message = "cancelled", f"{job.kind} cancelled after {job.done} frames"
                else:
                    job.state = "done"
            except LmrcError as exc:
                job.state, job.message = "error", str(exc)
            except Exception as exc:  # the page must hear of it; the server keeps running
                job.state, job.message = "error", f"{job.kind} failed: {type(exc).__name__}: {exc}"
            finally:
                job.finished = time.monotonic()

        with self.lock:
            self._check_idle()
            job.number = 1 if self.job is None else self.job.number + 1
            self.job = job
            job.thread = threading.Thread(target=run, name=f"lmrc-app-{job.kind}-{self.id[:8]}", daemon=True)
            job.thread.start()

    def propagate(self, segment: Callable[["Session", Job], None]) -> Job:
        """Propagate the prompts over the whole video (forward and backward) in the background with `segment`."""
        with self.lock:
            video = self._video()
            self._check_idle()
            if not self.prompts():
                raise LmrcError("nothing to propagate: add an object and draw its mask (a box, clicks or the brush) "
                                "on some frame first")
            job = Job("propagate", video.frames)
            shutil.rmtree(self.dir / "reliability", ignore_errors=True)  # maps of an earlier run
            self._sub("reliability")
        self._start(job, lambda: segment(self, job))
        return job

    def cancel(self) -> None:
        job = self.job
        if job is not None and job.state == "running":
            job.cancel.set()

    # --- exports -----------------------------------------------------------------------------------------------------

    EXPORTS = ("masks", "overlay", "cutout")

    def export(self, kind: str) -> Job:
        """Build a download in the background: masks (zip of DAVIS palette PNGs, `<seq>/<frame>.png`), overlay (mp4)
        or cutout (zip of RGBA PNGs, the objects kept, the rest transparent)."""
        if kind not in self.EXPORTS:
            raise LmrcError(f"unknown export {kind!r}; choose one of {', '.join(self.EXPORTS)}")
        with self.lock:
            video = self._video()
            self._check_idle()
            done = [i for i in range(video.frames) if self.mask_path(i).exists()]
            if not done:
                raise LmrcError("nothing to export yet: draw an object's mask and propagate it first")
            job = Job(f"export {kind}", len(done))
            exports = self._sub("exports")
        name = f"{video.name}_{'masks.zip' if kind == 'masks' else 'overlay.mp4' if kind == 'overlay' else 'cutout.zip'}"
        target = exports / name

        def build() -> None:
            if kind == "overlay":
                self._export_overlay(video, done, target, job)
            else:
                self._export_zip(video, done, target, job, cutout=kind == "cutout")
            if not job.cancel.is_set():
                job.result = name
                missing = video.frames - len(done)
                job.message = (f"exported {len(done)} frames" +
                               (f" ({missing} frames have no mask yet: propagate to fill them)" if missing else ""))

        self._start(job, build)
        return job

    def _export_zip(self, video: Video, frames: list[int], target: Path, job: Job, cutout: bool) -> None:
        with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
            for index in frames:
                if job.cancel.is_set():
                    raise LmrcError("export cancelled")
                name = video.frame_names[index]
                if cutout:
                    keep = self.ids(index) > 0
                    # transparent pixels hold black: a smaller file, and nothing of the background leaks out
                    rgba = np.dstack([self.frame_rgb(index) * keep[..., None], keep * np.uint8(255)])
                    buffer = io.BytesIO()
                    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG", compress_level=1)  # 6: 2.4x slower
                    archive.writestr(f"{video.name}/{name}.png", buffer.getvalue())
                else:  # the stored masks already are DAVIS palette PNGs
                    archive.write(self.mask_path(index), f"{video.name}/{name}.png")
                job.done += 1

    def _export_overlay(self, video: Video, frames: list[int], target: Path, job: Job) -> None:
        from lmrc.inference.io import OverlayWriter

        with OverlayWriter(target, video.fps, (video.height, video.width), overwrite=True) as writer:
            for index in range(video.frames):
                if job.cancel.is_set():
                    raise LmrcError("export cancelled")
                ids = self.ids(index)
                writer.write(self.frame_rgb(index), ids if ids is not None else np.zeros((video.height, video.width),
                                                                                          np.uint8))
                job.done = min(job.total, job.done + (ids is not None))

    def export_file(self, name: str) -> Path:
        path = self.dir / "exports" / Path(name).name
        if not path.is_file():
            raise LmrcError(f"export {name} not found; export again")
        return path

    # --- reporting and ending ---------------------------------------------------------------------------------------

    def status(self) -> dict:
        with self.lock:
            video = self.video
            palette = davis_palette()
            masked = ([i for i in range(video.frames) if self.mask_path(i).exists()] if video is not None else [])
            return {
                "session": self.id,
                "generation": self.generation,
                "video": None if video is None else {
                    "name": video.name, "frames": video.frames, "width": video.width, "height": video.height,
                    "fps": video.fps},
                "objects": [{"id": o, "colour": "#%02x%02x%02x" % tuple(palette[o])} for o in self.objects],
                "prompt_frames": sorted(self.prompt_frames),
                "masked_frames": masked,
                "reliability_frames": ([i for i in masked if self.reliability_path(i).exists()]),
                "job": None if self.job is None else self.job.as_dict(),
                "limits": self.limits.describe(),
            }

    def close(self) -> None:
        """Stop the job and delete the session's folder (frames, masks, uploads, exports)."""
        self.closed = True
        job = self.job
        if job is not None and job.thread is not None:
            job.cancel.set()
            job.thread.join(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)
