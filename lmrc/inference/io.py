"""Inputs and outputs of `lmrc segment` around the network: mask prompts, result masks, soft maps, overlay video.

- `load_prompts(mask_path, frames)`: the user's masks, checked and mapped to frame indices (`Prompts`).
- `ResultWriter(out_dir)`: one DAVIS-palette index PNG per frame (`<frame name>.png`), optional soft maps.
- `OverlayWriter(path, fps, size)`: masks blended over the frames, as an mp4.

Every file is written under a temporary name and renamed when complete, so an interrupted run never leaves a
half-written file under a final name.

Soft maps (`--save-probs`): one compressed `probs/<frame name>.npz` per frame holding `probs` (K x H x W uint8,
probability * 255, rounded, one channel per object; background = 1 - sum) and `object_ids` (K int32, the object
id of each channel). One file per frame keeps a frame's maps consistent (written atomically together) and ties
each channel to its id; read with `np.load(path)["probs"] / 255`.
"""
from __future__ import annotations

import contextlib
import io
import sys
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from lmrc.data.masks import davis_palette, read_mask, write_mask
from lmrc.data.video import FrameSource, natural_key
from lmrc.utils.errors import LmrcError, LmrcWarning
from lmrc.fileio import atomic_path

# Id 255 is DAVIS' "void" label, so results can hold ids 1..254.
MAX_OBJECT_ID = 254
# A mask this close to the frame size (per side) is a rounding slip, e.g. 853 x 480 for an 854 x 480 frame.
SIZE_TOLERANCE = 0.02
SIZE_TOLERANCE_PIXELS = 2
PROBS_FOLDER = "probs"


@dataclass
class Prompts:
    """The user's masks, ready for the segmenter.

    masks: frame index -> H x W uint8 object ids at the frame size, in frame order (only frames that have a mask).
    object_ids: sorted ids of all objects. first_frame: object id -> index of the first frame whose mask has it.
    files: frame index -> the mask file it came from. warnings: the repairs made (also issued as LmrcWarning).
    """

    masks: dict[int, np.ndarray]
    object_ids: list[int]
    first_frame: dict[int, int]
    files: dict[int, Path] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def new_objects(self, index: int) -> list[int]:
        """Ids whose first mask is at frame `index`."""
        return [i for i in self.object_ids if self.first_frame[i] == index]


class _FrameTable:
    """Frame names -> indices, from a FrameSource or from a plain list of names."""

    def __init__(self, frames: FrameSource | Sequence[str], size: tuple[int, int] | None):
        if isinstance(frames, FrameSource):
            self.source = frames
            self.size = tuple(size) if size is not None else frames.size
            self.count = frames.num_frames
            self.where = str(frames.path)
        else:
            if size is None:
                raise ValueError("load_prompts needs the frame size (H, W) when given a list of frame names")
            self.source = None
            self.names = list(frames)
            self.size = tuple(size)
            self.count = len(self.names)
            self.where = "the input"

    def index_of(self, name: str) -> int | None:
        if self.source is not None:
            return self.source.index_of(name)
        if name in self.names:
            return self.names.index(name)
        if name.isdigit():
            same = [i for i, n in enumerate(self.names) if n.isdigit() and int(n) == int(name)]
            return same[0] if len(same) == 1 else None
        return None


def load_prompts(mask_path: str | Path, frames: FrameSource | Sequence[str], size: tuple[int, int] | None = None,
                 *, max_id: int = MAX_OBJECT_ID) -> Prompts:
    """Read the user's mask(s) and attach each to its frame.

    mask_path: a palette PNG (object ids), a binary 0/255 PNG (DAVIS 2016), or a folder of such PNGs named like
    frames (sparse prompts: later masks introduce new objects, as in YouTube-VOS). A single file applies to the frame
    with the same name, else to frame 0. `frames`: the FrameSource, or the frame names in order plus `size` (H, W).
    A mask a few pixels off the frame size (<= 2% of each side, at least 2 pixels) is resized with nearest
    neighbour and a warning; other problems raise LmrcError: missing/unreadable file, other sizes, an empty mask,
    a mask naming no frame, ids above `max_id` (<= 254). Palette PNGs are read by their pixel indices, whatever
    their palette holds (as the DAVIS evaluator does).
    """
    mask_path = Path(mask_path)
    table = _FrameTable(frames, size)
    notes: list[str] = []
    if not mask_path.exists():
        raise LmrcError(f"mask {mask_path} not found; pass the first frame's mask (PNG) or a folder of masks")
    if mask_path.is_dir():
        files = sorted((p for p in mask_path.iterdir()
                        if p.suffix.lower() == ".png" and not p.name.startswith(".") and p.is_file()),
                       key=lambda p: natural_key(p.name))
        if not files:
            raise LmrcError(f"mask folder {mask_path} holds no PNG masks; save the masks as PNGs named like the frames")
        placed: dict[int, Path] = {}
        for file in files:
            index = table.index_of(file.stem)
            if index is None:
                raise LmrcError(f"mask {file} names no frame of {table.where}: masks in a folder must be named "
                                f"like the frame they belong to (e.g. 00000.png for frame 00000)")
            if index in placed:
                raise LmrcError(f"masks {placed[index].name} and {file.name} both name frame {index}; keep one")
            placed[index] = file
        if table.count and len(placed) > 2 and len(placed) >= table.count // 2:
            _note(notes, f"mask folder {mask_path} has masks for {len(placed)} of {table.count} frames and every one "
                         "is used as a prompt; for semi-supervised segmentation pass only the first mask "
                         "(or the masks where new objects appear)")
    else:
        index = table.index_of(mask_path.stem)
        if index is None:
            index = 0
            if mask_path.stem.isdigit() and mask_path.stem.lstrip("0"):
                _note(notes, f"mask {mask_path.name} matches no frame name; using it for the first frame")
        placed = {index: mask_path}

    masks: dict[int, np.ndarray] = {}
    first_frame: dict[int, int] = {}
    for index in sorted(placed):
        ids = _read_prompt(placed[index], table.size, max_id, notes)
        masks[index] = ids
        for object_id in np.unique(ids).tolist():
            if object_id:
                first_frame.setdefault(int(object_id), index)
    if not first_frame:  # unreachable while empty masks are refused one by one; kept as the stated contract
        raise LmrcError(f"the masks in {mask_path} contain no object")
    return Prompts(masks=masks, object_ids=sorted(first_frame), first_frame=first_frame, files=placed,
                   warnings=notes)


def _note(notes: list[str], message: str) -> None:
    notes.append(message)
    warnings.warn(message, LmrcWarning, stacklevel=3)


def _read_prompt(path: Path, frame_size: tuple[int, int], max_id: int, notes: list[str]) -> np.ndarray:
    """One mask file -> H x W uint8 ids at `frame_size`, checked."""
    # A palette PNG is read by its pixel indices whatever its palette holds, as the DAVIS evaluator and Cutie do:
    # `Image.fromarray(ids, mode="P")` saves ids with a one-colour palette, and the colours carry no meaning here.
    ids = read_mask(path)
    top = int(ids.max())
    limit = min(max_id, MAX_OBJECT_ID)
    if top > limit:
        raise LmrcError(f"mask {path} uses object id {top}; ids must be 1..{limit} (0 is background, 255 void). "
                        "Renumber the objects")
    if top == 0:
        raise LmrcError(f"mask {path} is empty (only background); draw at least one object, or delete the file")
    h, w = ids.shape
    fh, fw = frame_size
    if (h, w) != (fh, fw):
        close = all(abs(a - b) <= max(SIZE_TOLERANCE * b, SIZE_TOLERANCE_PIXELS) for a, b in ((h, fh), (w, fw)))
        if not close:
            hint = " (rotated?)" if (h, w) == (fw, fh) else ""
            raise LmrcError(f"mask {path} is {w}x{h} but the frames are {fw}x{fh}{hint}; "
                            "draw the mask on a frame of this video, at its size")
        # Nearest keeps ids intact (no blending between labels).
        ids = np.asarray(Image.fromarray(ids, mode="L").resize((fw, fh), Image.NEAREST), dtype=np.uint8)
        _note(notes, f"mask {path} is {w}x{h} but the frames are {fw}x{fh}; resized it (nearest neighbour)")
        if not ids.any():
            raise LmrcError(f"mask {path} holds no object after resizing to {fw}x{fh}")
    return ids


class ResultWriter:
    """Writes `<out_dir>/<frame name>.png` (DAVIS palette ids) and, on request, `<out_dir>/probs/<name>.npz`.

    An out_dir that already holds PNGs is refused unless `overwrite` (the old masks and soft maps are deleted at
    the start, so old and new results never mix) or `resume` (they are kept; `done(name)` tells which frames to
    skip writing; the segmenter must still run those frames to build its memory). PNGs that are not palette masks
    (e.g. the input frames) are never touched: such a folder is refused in every mode.
    """

    def __init__(self, out_dir: str | Path, *, overwrite: bool = False, resume: bool = False,
                 save_probs: bool = False, size: tuple[int, int] | None = None):
        if overwrite and resume:
            raise LmrcError("--overwrite and --resume exclude each other; choose one")
        self.out_dir = Path(out_dir)
        self.save_probs = save_probs
        self.size = tuple(size) if size is not None else None
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise LmrcError(f"output {self.out_dir} is a file; pass a folder to --out")
        existing = self._existing_masks()
        self._done: set[str] = set()
        if existing:
            if not (overwrite or resume):
                example = existing[0].name
                raise LmrcError(f"output folder {self.out_dir} already holds {len(existing)} result masks "
                                f"(e.g. {example}); pass --overwrite to replace them, --resume to continue that "
                                "run, or choose another --out")
            if overwrite:
                for file in existing:
                    file.unlink()
                probs = self.out_dir / PROBS_FOLDER
                if probs.is_dir():
                    for file in probs.glob("*.npz"):
                        file.unlink()
            else:
                self._done = {f.stem for f in existing}
                if save_probs:
                    # A mask is written after its soft maps, so a done frame has them unless the old run had none.
                    missing = [n for n in self._done if not self.probs_path(n).exists()]
                    if missing:
                        raise LmrcError(f"--resume with --save-probs: {len(missing)} finished frames in "
                                        f"{self.out_dir} have no soft maps (e.g. {sorted(missing)[0]}); "
                                        "use --overwrite to redo them")
        self._clear_leftovers()
        self.written: list[str] = []

    def _existing_masks(self) -> list[Path]:
        if not self.out_dir.is_dir():
            return []
        pngs = sorted((p for p in self.out_dir.glob("*.png") if not p.name.startswith(".")),
                      key=lambda p: natural_key(p.name))
        for png in pngs:
            try:
                with Image.open(png) as image:
                    mode = image.mode
            except (OSError, ValueError):
                mode = "unreadable"
            if mode != "P":
                raise LmrcError(f"output folder {self.out_dir} holds {png.name}, which is not an lmrc result mask "
                                f"(image mode {mode}); choose an --out folder apart from the input frames")
        return pngs

    def _clear_leftovers(self) -> None:
        # Temporary files of a killed run (atomic_path names them .<name>.<random>.tmp<ext>).
        for folder in (self.out_dir, self.out_dir / PROBS_FOLDER):
            if folder.is_dir():
                for pattern in (".*.tmp.png", ".*.tmp.npz"):
                    for file in folder.glob(pattern):
                        file.unlink(missing_ok=True)

    def mask_path(self, name: str) -> Path:
        return self.out_dir / f"{name}.png"

    def probs_path(self, name: str) -> Path:
        return self.out_dir / PROBS_FOLDER / f"{name}.npz"

    def done(self, name: str) -> bool:
        """True when frame `name` was finished by the run being resumed (or already written by this one)."""
        return name in self._done

    def load(self, name: str) -> np.ndarray:
        """The stored ids (H x W uint8) of a finished frame, e.g. to draw a resumed run's overlay."""
        return read_mask(self.mask_path(name), void_as_background=False)

    def write(self, name: str, ids: np.ndarray, probs: np.ndarray | None = None,
              object_ids: Sequence[int] | None = None) -> None:
        """Store frame `name`: ids H x W (0 background, 1..254 objects); with save_probs, probs K x H x W in [0, 1]
        for the objects `object_ids` (length K, background channel excluded)."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids must be H x W, got shape {ids.shape}")
        if self.size is not None and ids.shape != self.size:
            raise ValueError(f"ids of frame {name} are {ids.shape}, expected {self.size}")
        if ids.size and (ids.min() < 0 or ids.max() > MAX_OBJECT_ID):
            raise ValueError(f"ids of frame {name} must be in 0..{MAX_OBJECT_ID}")
        if self.save_probs:
            if probs is None or object_ids is None:
                raise ValueError("save_probs is on: pass probs (K x H x W) and object_ids (K)")
            self._write_probs(name, probs, object_ids, ids.shape)
        # The mask goes last: its presence marks the frame finished for --resume.
        write_mask(self.mask_path(name), ids.astype(np.uint8))
        self._done.add(name)
        self.written.append(name)

    def _write_probs(self, name: str, probs: np.ndarray, object_ids: Sequence[int], shape: tuple[int, int]) -> None:
        if hasattr(probs, "detach"):  # a torch tensor; avoid importing torch here
            probs = probs.detach().cpu().numpy()
        probs = np.asarray(probs, dtype=np.float32)
        object_ids = np.asarray(list(object_ids), dtype=np.int32)
        if probs.ndim != 3 or probs.shape[1:] != tuple(shape) or probs.shape[0] != len(object_ids):
            raise ValueError(f"probs must be K x H x W with K = len(object_ids) = {len(object_ids)} and "
                             f"H x W = {shape}; got {probs.shape}")
        quantised = np.rint(np.clip(probs, 0.0, 1.0) * 255).astype(np.uint8)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, probs=quantised, object_ids=object_ids)
        with atomic_path(self.probs_path(name)) as tmp:
            tmp.write_bytes(buffer.getvalue())


def overlay(rgb: np.ndarray, ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Masks blended over a frame: rgb H x W x 3 uint8, ids H x W -> H x W x 3 uint8, object outlines opaque."""
    colours = davis_palette()[ids]
    out = rgb.astype(np.float32)
    inside = ids > 0
    out[inside] = (1 - alpha) * out[inside] + alpha * colours[inside]
    # Outlines: pixels whose right or lower neighbour has another id.
    edge = np.zeros(ids.shape, dtype=bool)
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
    out[edge & inside] = colours[edge & inside]
    return out.astype(np.uint8)


class OverlayWriter:
    """An mp4 (or mov/mkv) of masks blended over frames, encoded with h264 (libx264) when available, else mpeg4.

    Written to a temporary name beside `path` and renamed by `close()`; `abort()` (or an exception inside a `with`
    block) deletes it, so nothing half-written ever sits at `path`. size: (H, W) of the frames; odd sides are
    padded by one pixel because yuv420p needs even ones.
    """

    CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".m4v": "mp4"}

    def __init__(self, path: str | Path, fps: float, size: tuple[int, int], *, overwrite: bool = False,
                 alpha: float = 0.5):
        import av  # only needed when an overlay is asked for

        self.path = Path(path)
        container_format = self.CONTAINERS.get(self.path.suffix.lower())
        if container_format is None:
            raise LmrcError(f"overlay {self.path}: use a .mp4 (or .mov, .mkv) file name")
        if self.path.exists() and not overwrite:
            raise LmrcError(f"overlay {self.path} already exists; pass --overwrite or choose another name")
        if not fps or fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.size = (int(size[0]), int(size[1]))
        self.alpha = alpha
        self.frames_written = 0
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_path(self.path))
        try:
            self._container = av.open(str(self._tmp), mode="w", format=container_format)
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            # 29.97 -> 30000/1001: encoders want a rational rate with a small denominator.
            rate = Fraction(fps).limit_denominator(1001)
            options = {"preset": "veryfast", "crf": "20"} if codec == "libx264" else {}
            self._stream = self._container.add_stream(codec, rate=rate, options=options)
            h, w = self.size
            self._stream.height, self._stream.width = h + h % 2, w + w % 2
            self._stream.pix_fmt = "yuv420p"
            self.codec = codec
        except BaseException:
            self._close_container()
            self._stack.__exit__(*sys.exc_info())
            raise
        self._closed = False

    def write(self, rgb: np.ndarray, ids: np.ndarray) -> None:
        """Add one frame: rgb H x W x 3 uint8, ids H x W object ids."""
        if rgb.shape[:2] != self.size or ids.shape != self.size:
            raise ValueError(f"overlay frames must be {self.size}, got rgb {rgb.shape} and ids {ids.shape}")
        image = overlay(rgb, ids, self.alpha)
        h, w = self.size
        if h % 2 or w % 2:
            image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        frame = self._av_frame(image)
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames_written += 1

    def _av_frame(self, image: np.ndarray):
        import av

        return av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")

    def close(self) -> None:
        """Flush the encoder and move the video to its final name (no file at all when no frame was written)."""
        if self._closed:
            return
        self._closed = True
        if self.frames_written == 0:
            warnings.warn(f"overlay {self.path}: no frames were written; no video created", LmrcWarning,
                          stacklevel=2)
            self._close_container()
            self._stack.__exit__(RuntimeError, RuntimeError("empty overlay"), None)
            return
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
        except BaseException:
            self._close_container()
            self._stack.__exit__(*sys.exc_info())
            raise
        self._stack.close()  # renames the temporary file onto self.path

    def abort(self) -> None:
        """Drop the video: the temporary file is deleted and `path` is left as it was."""
        if self._closed:
            return
        self._closed = True
        self._close_container()
        self._stack.__exit__(RuntimeError, RuntimeError("overlay aborted"), None)

    def _close_container(self) -> None:
        container = getattr(self, "_container", None)
        if container is not None:
            with contextlib.suppress(Exception):
                container.close()

    def __enter__(self) -> "OverlayWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
