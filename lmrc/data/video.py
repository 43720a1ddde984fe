"""Frame sources for `lmrc segment`: video files (PyAV), folders of jpg/png frames, DAVIS / YouTube-VOS roots.

Every source is a lazy, re-iterable sequence of `Frame`s: nothing is decoded before it is asked for, and only one
frame is held at a time, so a long video never sits in memory. Use `open_frames(path)`; it picks the reader.

Frame indices are positions in the source (0-based). A frame skipped with `skip_bad_frames=True` leaves a gap in
the indices and is listed in `source.skipped`, so the indices of the frames after it still match the source.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from lmrc.utils.errors import BadFrameError, LmrcError, LmrcWarning

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".webm", ".mkv", ".m4v")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Folders of frames carry no frame rate; overlays of them use this one.
DEFAULT_FPS = 24.0


@dataclass(frozen=True)
class Frame:
    """One decoded frame: `index` in the source, `name` for outputs (file stem or `00042`), `rgb` H x W x 3 uint8."""

    index: int
    name: str
    rgb: np.ndarray


def natural_key(text: str) -> list:
    """Sort key so that `frame2` comes before `frame10`."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


class FrameSource:
    """A lazy, re-iterable source of `Frame`s.

    Attributes: `path` (file or folder read), `fps` (float, or None when unknown, e.g. for folders),
    `skip_bad_frames`, `skipped` (indices skipped by the latest iteration). `len(source)` works when the frame count
    is known (raises TypeError otherwise; `num_frames` is then None). `size` is (H, W) of the first frame.
    """

    kind = "frames"

    def __init__(self, path: Path, skip_bad_frames: bool = False):
        self.path = path
        self.skip_bad_frames = skip_bad_frames
        self.fps: float | None = None
        self.skipped: list[int] = []
        self._size: tuple[int, int] | None = None

    # -- to implement -------------------------------------------------------------------------------------------
    def _frames(self) -> Iterator[Frame]:
        raise NotImplementedError

    @property
    def num_frames(self) -> int | None:
        """Number of frames when known without decoding them, else None."""
        return None

    @property
    def names(self) -> list[str] | None:
        """Frame names in order, when known without decoding; else None."""
        return None

    def index_of(self, name: str) -> int | None:
        """Index of the frame called `name` (exact, or the same number: `5` finds `00005`), or None."""
        names = self.names
        if names is None:
            return None
        lookup = {n: i for i, n in enumerate(names)}
        if name in lookup:
            return lookup[name]
        if name.isdigit():
            numeric = [i for i, n in enumerate(names) if n.isdigit() and int(n) == int(name)]
            if len(numeric) == 1:
                return numeric[0]
        return None

    # -- shared -------------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Frame]:
        self.skipped = []
        return self._frames()

    def __len__(self) -> int:
        count = self.num_frames
        if count is None:
            raise TypeError(f"the number of frames of {self.path} is not known before decoding it")
        return count

    def __bool__(self) -> bool:
        # Without this, truth tests would call __len__ and fail for sources of unknown length.
        return True

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the first frame (decodes that one frame once, then cached)."""
        if self._size is None:
            skipped = self.skipped
            frames = iter(self)
            try:
                with warnings.catch_warnings():
                    # A skipped first frame is reported again when the caller iterates; say it once.
                    warnings.simplefilter("ignore", LmrcWarning)
                    first = next(frames, None)
            finally:
                frames.close()  # releases the decoder / file now rather than at garbage collection
                self.skipped = skipped
            if first is None:
                raise LmrcError(f"{self.path} holds no readable frame")
            self._size = first.rgb.shape[:2]
        return self._size

    def _bad_frame(self, index: int, what: str, reason: str) -> None:
        """Raise for a frame that cannot be decoded, or (skip_bad_frames) record it and warn."""
        if not self.skip_bad_frames:
            raise BadFrameError(
                f"frame {index} ({what}) cannot be decoded: {reason}; "
                "repair or remove it, or pass --skip-bad-frames to continue without it"
            )
        self.skipped.append(index)
        warnings.warn(f"skipping frame {index} ({what}): {reason}", LmrcWarning, stacklevel=3)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, frames={self.num_frames}, fps={self.fps})"


class FolderSource(FrameSource):
    """Frames stored as jpg/png files in one folder, sorted naturally; names are the file stems."""

    kind = "folder"

    def __init__(self, path: Path, files: list[Path], skip_bad_frames: bool = False):
        super().__init__(path, skip_bad_frames)
        self.files = files
        self.sequence = path.name
        stems = [f.stem for f in files]
        duplicates = sorted({s for s in stems if stems.count(s) > 1}, key=natural_key)
        if duplicates:
            raise LmrcError(
                f"frame folder {path} has several files named {duplicates[0]} (e.g. .jpg and .png); "
                "keep one image per frame"
            )

    @property
    def num_frames(self) -> int:
        return len(self.files)

    @property
    def names(self) -> list[str]:
        return [f.stem for f in self.files]

    def _frames(self) -> Iterator[Frame]:
        expected: tuple[int, int] | None = self._size
        for index, file in enumerate(self.files):
            try:
                rgb = _read_image(file)
            except FileNotFoundError:
                self._bad_frame(index, f"file {file}", "the file disappeared while reading")
                continue
            except (OSError, ValueError, SyntaxError) as exc:  # PIL reports truncated/corrupt files as OSError
                self._bad_frame(index, f"file {file}", str(exc) or type(exc).__name__)
                continue
            if expected is None:
                expected = rgb.shape[:2]
            elif rgb.shape[:2] != expected:
                h, w = rgb.shape[:2]
                self._bad_frame(index, f"file {file}", f"it is {w}x{h} while the frames before it are "
                                                  f"{expected[1]}x{expected[0]}")
                continue
            yield Frame(index, file.stem, rgb)


def _read_image(file: Path) -> np.ndarray:
    with Image.open(file) as image:
        # Phone JPEGs store rotation in EXIF; show them as viewers (and mask-drawing tools) do.
        image = ImageOps.exif_transpose(image)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


class VideoSource(FrameSource):
    """Frames decoded one by one from a video file with PyAV; names are `00000`, `00001`, ..."""

    kind = "video"

    def __init__(self, path: Path, skip_bad_frames: bool = False):
        super().__init__(path, skip_bad_frames)
        self.sequence = path.stem
        import av  # only video inputs need PyAV

        self._av = av
        # Open once up front so that a missing stream or an unreadable file is reported before any work starts.
        container = self._open()
        try:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else None
            self._declared = int(stream.frames or 0) or None
            # Containers without a frame count (mkv, webm) still give a duration: a rough count for truncation checks.
            self._estimated = None
            if self._declared is None and container.duration and self.fps:
                self._estimated = int(container.duration / 1_000_000 * self.fps + 0.5)
        finally:
            container.close()

    def _open(self):
        av = self._av
        try:
            container = av.open(str(self.path))
        except FileNotFoundError:
            raise LmrcError(f"input video {self.path} not found") from None
        except (av.FFmpegError, OSError) as exc:
            raise LmrcError(
                f"cannot open video {self.path} ({exc}); the file is truncated, corrupt or not a video. "
                "Re-export it, or extract the frames to a folder (e.g. with ffmpeg) and pass that folder"
            ) from None
        if not container.streams.video:
            container.close()
            raise LmrcError(f"{self.path} holds no video stream")
        return container

    @property
    def num_frames(self) -> int | None:
        return self._declared

    @property
    def names(self) -> list[str] | None:
        return None if self._declared is None else [f"{i:05d}" for i in range(self._declared)]

    def index_of(self, name: str) -> int | None:
        # Video frames are numbered: any numeric name is an index, checked against the length when known.
        if not name.isdigit():
            return None
        index = int(name)
        return index if self._declared is None or index < self._declared else None

    def _frames(self) -> Iterator[Frame]:
        av = self._av
        container = self._open()
        index = 0
        try:
            stream = container.streams.video[0]
            packets = container.demux(stream)
            while True:
                try:
                    packet = next(packets)
                except StopIteration:
                    break
                except av.FFmpegError as exc:
                    # The container itself is unreadable from here on: nothing more can be decoded.
                    self._bad_frame(index, f"video {self.path}", f"the file cannot be read past this point ({exc})")
                    break
                try:
                    decoded = packet.decode()  # the final empty packet flushes the decoder
                except av.FFmpegError as exc:
                    self._bad_frame(index, f"video {self.path}", str(exc))
                    index += 1
                    continue
                for frame in decoded:
                    yield Frame(index, f"{index:05d}", frame.to_ndarray(format="rgb24"))
                    index += 1
        finally:
            container.close()
        self._check_complete(index)

    def _check_complete(self, count: int) -> None:
        """A truncated file just ends early: compare with the frame count its header promised."""
        expected, exact = (self._declared, True) if self._declared else (self._estimated, False)
        if not expected:
            return
        missing = expected - count
        # Edit lists and duration rounding can hide a frame or two in healthy files; more means damage.
        tolerance = 2 if exact else 3
        if missing <= 0:
            return
        skipped = f" ({len(self.skipped)} of them skipped)" if self.skipped else ""
        message = (f"video {self.path} ended after {count} frames{skipped} but its header announces "
                   f"{'' if exact else 'about '}{expected}; the file looks truncated or damaged")
        if missing > tolerance and not self.skip_bad_frames:
            raise LmrcError(message + "; re-export it, or pass --skip-bad-frames to keep the frames that decoded")
        warnings.warn(message, LmrcWarning, stacklevel=3)


def _list_images(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir()
             if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()]
    return sorted(files, key=lambda p: natural_key(p.name))


def _sequence_folders(base: Path) -> list[Path]:
    """Sub-folders of `base` that hold frames (DAVIS / YouTube-VOS sequences)."""
    if not base.is_dir():
        return []
    folders = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".") and _list_images(p)]
    return sorted(folders, key=lambda p: natural_key(p.name))


def open_frames(path: str | Path, *, sequence: str | None = None, skip_bad_frames: bool = False,
                resolution: str = "480p") -> FrameSource:
    """Open a video file, a folder of frames, or a DAVIS / YouTube-VOS root, lazily.

    - video (mp4, mov, avi, webm, mkv, m4v): decoded with PyAV, names `00000`, `00001`, ...
    - folder of jpg/png frames: sorted naturally, names are file stems
    - `<root>/JPEGImages/<resolution>/<seq>` (DAVIS) or `<root>/JPEGImages/<seq>` (YouTube-VOS), or a folder of
      sequence folders: the sequence named `sequence`, or the only one there; several -> LmrcError listing them.
    A frame that cannot be decoded raises LmrcError naming it, or with `skip_bad_frames` is skipped with an
    `LmrcWarning` and listed in `source.skipped`.
    """
    path = Path(path)
    if not path.exists():
        raise LmrcError(f"input {path} not found; pass a video file, a folder of frames or a DAVIS/YouTube-VOS folder")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in VIDEO_EXTENSIONS:
            return VideoSource(path, skip_bad_frames)
        if suffix in IMAGE_EXTENSIONS:
            raise LmrcError(f"input {path} is a single image; pass the folder that holds all the frames "
                            f"({path.parent})")
        raise LmrcError(f"input {path} has extension {suffix or '(none)'!r}, which lmrc cannot read; pass a video "
                        f"({', '.join(e[1:] for e in VIDEO_EXTENSIONS)}) or a folder of jpg/png frames")
    if not path.is_dir():
        raise LmrcError(f"input {path} is neither a file nor a folder")
    try:
        files = _list_images(path)
    except PermissionError:
        raise LmrcError(f"input folder {path} cannot be read (permission denied)") from None
    if files:
        return FolderSource(path, files, skip_bad_frames)

    # No frames here: a dataset root, its JPEGImages folder, or any folder of sequence folders.
    base = path
    if (base / "JPEGImages").is_dir():
        base = base / "JPEGImages"
    if (base / resolution).is_dir() and not _list_images(base / resolution):
        base = base / resolution
    sequences = _sequence_folders(base)
    if sequence is not None:
        chosen = base / sequence
        if chosen in sequences:
            return FolderSource(chosen, _list_images(chosen), skip_bad_frames)
        raise LmrcError(f"sequence {sequence!r} not found in {base}; it holds: {_name_list(sequences)}")
    if len(sequences) == 1:
        return FolderSource(sequences[0], _list_images(sequences[0]), skip_bad_frames)
    if sequences:
        raise LmrcError(f"{path} holds {len(sequences)} sequences: {_name_list(sequences)}; pass one of them, "
                        f"e.g. {sequences[0]}")
    raise LmrcError(f"input folder {path} holds no jpg/png frames (and no DAVIS/YouTube-VOS sequences); "
                    "put the frames there, or pass a video file")


def _name_list(folders: list[Path], limit: int = 20) -> str:
    names = [f.name for f in folders[:limit]]
    more = f", ... and {len(folders) - limit} more" if len(folders) > limit else ""
    return ", ".join(names) + more if names else "(nothing)"
