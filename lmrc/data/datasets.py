"""Training data: dataset readers (-> ``VideoSequence``) and torch Datasets of 3-frame training samples.

Readers: ``read_davis2016``, ``read_davis2017``, ``read_youtube_vos``, ``read_frame_folders``, ``read_video_masks``
(a video file per sequence + per-frame masks; frames decoded once into a JPEG cache) and ``read_image_masks``
(single images + masks, for ``StaticImageClips``), or ``read_dataset`` by kind. Each returns a list of ``VideoSequence``; ``include``/``exclude`` select sequences by name (hold out
validation sequences with ``exclude``). Problems a user can fix raise ``LmrcError``.

Sample dict (what ``VOSTrainingDataset``, ``MixedDataset``, ``StaticImageClips`` and ``PastedObjectClips`` return,
and what the trainer consumes; T = ``num_frames`` frames (3, the paper's sample, by default), N = ``max_objects`` (default 2), H x W = crop size (default 384)):

| key | value |
| --- | --- |
| ``images`` | float32 T x 3 x H x W, RGB in [0, 1] (not normalised) |
| ``masks`` | float32 T x N x H x W in {0, 1}; channel k is object slot k; empty slots are all zero |
| ``valid_objects`` | bool N; slot k holds an object that is present in frame 0 |
| ``info["name"]`` | str, the sequence (or synthetic source) name |
| ``info["frames"]`` | int64 T, frame indices in the sequence's frame list (all 0 for a static-image clip) |
| ``info["object_ids"]`` | int64 N, the dataset object id in each slot, 0 for an empty slot |
| ``info["source"]`` | str, the dataset's name (``VOSTrainingDataset(name=...)``) |

Frame order (Section III-E-2): frame 0 = global-memory frame (the annotated reference), frame 1 = local-memory
frame, frame 2 = query. The three frames are different and increase in time (``info["frames"]`` is increasing
unless ``reverse_prob`` reversed the clip), so the local-memory frame precedes the query and is the nearest
earlier one, as the previous frame is at inference; the global frame is the oldest, as the first frame and
every 5th frame are. The trainer encodes frame 1's value from its own prediction (STCN). ``valid_objects`` is
decided on frame 0; objects may leave the view in frames 1 and 2 (their masks are then empty there).

Frame gap: the three frames are drawn uniformly among the sets of *annotated* frames whose first and last are at
most ``max_gap`` annotated frames apart (the paper: "three different frames within 10 frames"). For densely
annotated DAVIS this is a gap in frames; for YouTube-VOS train (annotated every 5th frame) one step is 5 frames,
as in STCN's training. ``max_gap`` can be a ``GapSchedule`` (curriculum by iteration).

Indices and determinism: ``dataset[i]`` is a pure function of (``seed``, ``i``). ``i`` is a *global* sample
number that may exceed ``len(dataset)`` (which is the nominal epoch length): sequence ``i % S`` of a per-epoch
permutation of the S sequences, epoch ``i // S``; the curriculum iteration is ``i // batch_size``. Iterate with
``lmrc.data.sampling.TrainingIndexSampler(total, start=iteration * batch_size)`` to resume where a run stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lmrc.data.augment import ClipAugment, resize_short_side
from lmrc.data.masks import read_mask
from lmrc.data.sampling import (
    SALT_DISTRACTOR,
    SALT_MIX,
    GapSchedule,
    as_schedule,
    choose_frames,
    choose_objects,
    epoch_permutation,
    objects_present,
    pack_sample,
    sample_rng,
)
from lmrc.data.video import VIDEO_EXTENSIONS, VideoSource
from lmrc.utils.errors import LmrcError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CACHE_JPEG_QUALITY = 95  # decoded video frames kept as JPEG: DAVIS's own frames are JPEGs of about this quality


@dataclass
class VideoSequence:
    """One training video: its frames in order, the masks it has (by frame index), and its object ids."""

    name: str
    frames: list[Path]
    masks: dict[int, Path]
    object_ids: tuple[int, ...] = ()
    dataset: str = ""
    annotated: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.annotated = sorted(self.masks)


# ----------------------------------------------------------------------------------------------------------- readers

def read_davis2016(
    root: str | Path,
    *,
    split: str | None = "train",
    resolution: str = "480p",
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> list[VideoSequence]:
    """DAVIS 2016: binary 0/255 masks, one object (id 1). `split` names ``ImageSets/<resolution>/<split>.txt``
    (official pair lines ``/JPEGImages/480p/bear/00000.jpg /Annotations/480p/bear/00000.png``); ``None`` takes
    every folder under ``JPEGImages/<resolution>``."""
    root = _existing_dir(root, "DAVIS 2016")
    if split is None:
        names = _subdirs(root / "JPEGImages" / resolution)
        seqs = [_folder_sequence(n, root / "JPEGImages" / resolution / n, root / "Annotations" / resolution / n,
                                 object_ids=(1,), dataset="davis2016") for n in _select(names, include, exclude, root)]
        return _nonempty(seqs, root)
    list_file = root / "ImageSets" / resolution / f"{split}.txt"
    if not list_file.is_file():
        raise LmrcError(f"DAVIS 2016 split file {list_file} not found; check the dataset root or pass split=None "
                        "to use every sequence folder")
    pairs: dict[str, list[tuple[str, str]]] = {}
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise LmrcError(f"{list_file} line {number}: expected '<frame path> <mask path>', got {line!r}")
        frame_rel = parts[0].lstrip("/")
        pairs.setdefault(Path(frame_rel).parent.name, []).append((frame_rel, parts[1].lstrip("/")))
    seqs = []
    for name in _select(list(pairs), include, exclude, root):
        frames = [root / f for f, _ in pairs[name]]
        mask_dir = root / Path(pairs[name][0][1]).parent
        present = _listdir(mask_dir)
        masks = {i: root / m for i, (_, m) in enumerate(pairs[name]) if Path(m).name in present}
        seqs.append(_checked(VideoSequence(name, frames, masks, (1,), "davis2016"), mask_dir))
    return _nonempty(seqs, root)


def read_davis2017(
    root: str | Path,
    *,
    split: str | None = "train",
    resolution: str = "480p",
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> list[VideoSequence]:
    """DAVIS 2017: palette masks, several objects. `split` names ``ImageSets/2017/<split>.txt`` (one sequence
    name a line); ``None`` takes every folder. Object ids are those in the first mask (DAVIS annotates every
    object there)."""
    root = _existing_dir(root, "DAVIS 2017")
    if split is None:
        names = _subdirs(root / "JPEGImages" / resolution)
    else:
        list_file = root / "ImageSets" / "2017" / f"{split}.txt"
        if not list_file.is_file():
            raise LmrcError(f"DAVIS 2017 split file {list_file} not found; check the dataset root or pass "
                            "split=None to use every sequence folder")
        names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    seqs = [_folder_sequence(n, root / "JPEGImages" / resolution / n, root / "Annotations" / resolution / n,
                             dataset="davis2017") for n in _select(names, include, exclude, root)]
    return _nonempty(seqs, root)


def read_youtube_vos(
    root: str | Path,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> list[VideoSequence]:
    """YouTube-VOS train folder: ``JPEGImages/<vid>/*.jpg``, ``Annotations/<vid>/*.png`` (every 5th frame), and
    optionally ``meta.json`` (object ids from it; otherwise the ids in the first annotated mask)."""
    root = _existing_dir(root, "YouTube-VOS")
    meta_objects: dict[str, tuple[int, ...]] = {}
    meta_file = root / "meta.json"
    if meta_file.is_file():
        try:
            videos = json.loads(meta_file.read_text())["videos"]
            meta_objects = {v: tuple(sorted(int(k) for k in d.get("objects", {}))) for v, d in videos.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LmrcError(f"{meta_file} is not YouTube-VOS meta data ({exc}); fix or delete it") from None
    names = _subdirs(root / "JPEGImages")
    seqs = [_folder_sequence(n, root / "JPEGImages" / n, root / "Annotations" / n, dataset="youtube_vos",
                             object_ids=meta_objects.get(n)) for n in _select(names, include, exclude, root)]
    return _nonempty(seqs, root)


def read_frame_folders(
    root: str | Path,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> list[VideoSequence]:
    """A generic folder: ``<root>/JPEGImages/<seq>/`` + ``<root>/Annotations/<seq>/``, or ``<root>/<seq>/images/``
    + ``<root>/<seq>/masks/``. Frames and masks are matched by file stem (``00012.jpg`` <-> ``00012.png``)."""
    root = _existing_dir(root, "frame folder dataset")
    if (root / "JPEGImages").is_dir():
        names = _subdirs(root / "JPEGImages")
        dirs = {n: (root / "JPEGImages" / n, root / "Annotations" / n) for n in names}
    else:
        names = [n for n in _subdirs(root) if (root / n / "images").is_dir()]
        dirs = {n: (root / n / "images", root / n / "masks") for n in names}
    if not names:
        raise LmrcError(f"{root} holds no sequence: expected <root>/JPEGImages/<seq>/ with <root>/Annotations/<seq>/,"
                        " or <root>/<seq>/images/ with <root>/<seq>/masks/")
    seqs = [_folder_sequence(n, *dirs[n], dataset="folder") for n in _select(names, include, exclude, root)]
    return _nonempty(seqs, root)


def read_video_masks(
    root: str | Path,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    cache_dir: str | Path | None = None,
) -> list[VideoSequence]:
    """A video file per sequence plus a folder of per-frame masks: ``<root>/Videos/<seq>.mp4`` (or .mov, .avi,
    .webm, .mkv, .m4v) and ``<root>/Annotations/<seq>/00000.png, 00001.png, ...`` (mask i belongs to decoded frame
    i; palette PNGs of object ids, or 0/255 grey masks for one object).

    Every frame needs its mask, of the video's size. Each video is decoded once (PyAV) into a JPEG frame cache
    (``frame_cache_dir``), so training reads any frame at random as fast as a DAVIS JPEG; the cache is keyed by
    the video's path, size and modification time and reused by later runs.
    """
    root = _existing_dir(root, "video + masks dataset")
    video_dir, mask_root = root / "Videos", root / "Annotations"
    if not video_dir.is_dir() or not mask_root.is_dir():
        raise LmrcError(f"{root} must hold Videos/<seq>.mp4 and Annotations/<seq>/00000.png ... (one mask per frame)")
    videos = {}
    for entry in sorted(os.scandir(video_dir), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS and not path.name.startswith("."):
            if path.stem in videos:
                raise LmrcError(f"{video_dir} holds two videos named {path.stem} ({videos[path.stem].name}, "
                                f"{path.name}); keep one")
            videos[path.stem] = path
    if not videos:
        raise LmrcError(f"{video_dir} holds no video ({', '.join(VIDEO_EXTENSIONS)}); put one file per sequence there")
    cache = Path(cache_dir) if cache_dir is not None else frame_cache_dir()
    seqs = []
    for name in _select(list(videos), include, exclude, root):
        seqs.append(_video_sequence(name, videos[name], mask_root / name, cache))
    return _nonempty(seqs, root)


def frame_cache_dir() -> Path:
    """Where decoded video frames are kept: $LMRC_CACHE_DIR/frames, else ~/.cache/lmrc/frames."""
    base = os.environ.get("LMRC_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "lmrc") / "frames"


def _video_sequence(name: str, video: Path, mask_dir: Path, cache: Path) -> VideoSequence:
    if not mask_dir.is_dir():
        raise LmrcError(f"video {video} has no mask folder {mask_dir}; add its per-frame masks or remove the video")
    mask_files = sorted(f for f in _listdir(mask_dir) if f.lower().endswith(".png") and not f.startswith("."))
    bad = [f for f in mask_files if not Path(f).stem.isdigit()]
    if bad:
        raise LmrcError(f"mask {mask_dir / bad[0]} is not named by its frame index (00000.png, 00001.png, ...); "
                        "rename the masks of video " + str(video))
    masks = {int(Path(f).stem): mask_dir / f for f in mask_files}
    frames, (height, width) = decoded_frames(video, cache)
    if sorted(masks) != list(range(len(frames))):
        missing = sorted(set(range(len(frames))) - set(masks))
        extra = sorted(set(masks) - set(range(len(frames))))
        detail = (f"missing frame(s) {_index_list(missing)}" if missing else "") + (
            ("; " if missing else "") + f"masks beyond the last frame: {_index_list(extra)}" if extra else "")
        raise LmrcError(f"{mask_dir} holds {len(masks)} masks but video {video} has {len(frames)} frames ({detail}); "
                        "every frame needs a mask named by its index (00000.png ...)")
    for index, path in masks.items():
        try:
            with Image.open(path) as image:
                size = image.size
        except OSError as exc:
            raise LmrcError(f"mask {path} cannot be read as an image ({exc}); save it as a PNG") from None
        if size != (width, height):
            raise LmrcError(f"mask {path} is {size[0]}x{size[1]} but video {video} is {width}x{height}; save the "
                            "masks at the video's size")
    seq = VideoSequence(name, frames, masks, (), "video_masks")
    seq.object_ids = tuple(objects_present(read_mask(masks[0])))
    return seq


def _index_list(indices: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


def decoded_frames(video: Path, cache: Path) -> tuple[list[Path], tuple[int, int]]:
    """The frames of `video` as JPEG files in the cache (decoding it the first time); returns (paths, (H, W)).

    Decoding goes to a temporary folder renamed into place when complete, so an interrupted decode or two runs
    decoding the same video at once never leave a half-filled cache entry.
    """
    video = Path(video).resolve()
    try:
        stat = video.stat()
    except OSError:
        raise LmrcError(f"video {video} not found or unreadable") from None
    key = hashlib.sha1(f"{video}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache / f"{video.stem}-{key}"
    done = folder / "frames.json"
    if not done.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=cache))
        try:
            count, size = 0, None
            for frame in VideoSource(video):  # LmrcError naming the file if it cannot be opened or decoded
                Image.fromarray(frame.rgb).save(tmp / f"{frame.index:05d}.jpg", quality=CACHE_JPEG_QUALITY)
                count, size = count + 1, frame.rgb.shape[:2]
            if count == 0:
                raise LmrcError(f"video {video} holds no decodable frame; re-export it")
            (tmp / "frames.json").write_text(json.dumps({"count": count, "height": size[0], "width": size[1],
                                                         "video": str(video)}))
            try:
                os.rename(tmp, folder)
            except OSError:
                if not done.is_file():  # not another process's complete copy: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    info = json.loads(done.read_text())
    return [folder / f"{i:05d}.jpg" for i in range(info["count"])], (info["height"], info["width"])


def read_image_masks(
    root: str | Path,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> list[tuple[Path, Path]]:
    """Single annotated images (e.g. SOD): ``<root>/images/<id>.jpg`` (or .png) and ``<root>/masks/<id>.png``,
    matched by stem; returns (image, mask) pairs, the sources of ``StaticImageClips``. An image without a mask is
    an error naming it (a silently smaller dataset would go unnoticed)."""
    root = _existing_dir(root, "image + mask dataset")
    image_dir, mask_dir = root / "images", root / "masks"
    if not image_dir.is_dir() or not mask_dir.is_dir():
        raise LmrcError(f"{root} must hold images/<id>.jpg and masks/<id>.png (one mask per image)")
    images = {Path(f).stem: image_dir / f for f in sorted(_listdir(image_dir))
              if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")}
    masks = {Path(f).stem: mask_dir / f for f in _listdir(mask_dir) if f.lower().endswith(".png")}
    missing = sorted(set(images) - set(masks))
    if missing:
        raise LmrcError(f"image {images[missing[0]]} has no mask {mask_dir / (missing[0] + '.png')}"
                        + (f" ({len(missing)} images lack masks)" if len(missing) > 1 else "")
                        + "; add the masks or remove the images")
    names = _select(sorted(images), include, exclude, root)
    if not names:
        raise LmrcError(f"{image_dir} holds no image (after include/exclude); check the path and the selection")
    return [(images[n], masks[n]) for n in names]


# Kinds whose items are single annotated images (used as pseudo-videos by StaticImageClips), not videos.
IMAGE_READERS = {"image_masks": read_image_masks}

READERS = {
    "davis2016": read_davis2016,
    "davis2017": read_davis2017,
    "youtube_vos": read_youtube_vos,
    "folder": read_frame_folders,
    "video_masks": read_video_masks,
}


def read_dataset(kind: str, root: str | Path, **options) -> list[VideoSequence]:
    """Dispatch to a reader by `kind`: one of ``davis2016``, ``davis2017``, ``youtube_vos``, ``folder``,
    ``video_masks``."""
    if kind not in READERS:
        raise LmrcError(f"unknown dataset kind {kind!r}; use one of {', '.join(READERS)}")
    return READERS[kind](root, **options)


def _existing_dir(root: str | Path, what: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise LmrcError(f"{what} path {root} does not exist or is not a folder; pass the dataset's root folder")
    return root


def _listdir(folder: Path) -> set[str]:
    try:
        return set(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _subdirs(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise LmrcError(f"{folder} not found; check the dataset root and layout")
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _select(names: Sequence[str], include, exclude, root: Path) -> list[str]:
    names = list(dict.fromkeys(names))
    if include is not None:
        include = list(include)
        missing = sorted(set(include) - set(names))
        if missing:
            raise LmrcError(f"sequences {', '.join(missing)} requested with include are not in {root}; "
                            "check the names")
        names = [n for n in names if n in set(include)]
    if exclude is not None:
        # Unknown names in `exclude` are fine: one hold-out list may serve several datasets.
        names = [n for n in names if n not in set(exclude)]
    return names


def _folder_sequence(name: str, frame_dir: Path, mask_dir: Path, *, dataset: str,
                     object_ids: Sequence[int] | None = None) -> VideoSequence:
    frame_files = sorted(f for f in _listdir(frame_dir) if f.lower().endswith(IMAGE_SUFFIXES))
    if not frame_files:
        raise LmrcError(f"sequence {name}: no frames (.jpg/.png) in {frame_dir}; remove the sequence or add frames")
    mask_by_stem = {Path(m).stem: m for m in _listdir(mask_dir) if m.lower().endswith(".png")}
    frames = [frame_dir / f for f in frame_files]
    masks = {i: mask_dir / mask_by_stem[Path(f).stem] for i, f in enumerate(frame_files) if Path(f).stem in mask_by_stem}
    seq = _checked(VideoSequence(name, frames, masks, (), dataset), mask_dir)
    if object_ids is None:
        object_ids = objects_present(read_mask(seq.masks[seq.annotated[0]]))
    seq.object_ids = tuple(object_ids)
    return seq


def _checked(seq: VideoSequence, mask_dir: Path) -> VideoSequence:
    if not seq.masks:
        raise LmrcError(f"sequence {seq.name} has {len(seq.frames)} frames but no masks in {mask_dir} (masks are "
                        "PNGs named like their frames); add the annotations or exclude the sequence")
    return seq


def _nonempty(seqs: list[VideoSequence], root: Path) -> list[VideoSequence]:
    if not seqs:
        raise LmrcError(f"{root} holds no sequence (after include/exclude); check the path and the selection")
    return seqs


# ------------------------------------------------------------------------------------------------------ clip loading

def load_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))  # writable: torch.from_numpy warns on read-only arrays
    except FileNotFoundError:
        raise LmrcError(f"frame {path} not found; the dataset changed after it was read") from None
    except OSError as exc:
        raise LmrcError(f"frame {path} cannot be read as an image ({exc}); re-extract or remove it") from None


def stack_clip(images: Sequence[np.ndarray], ids: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """H x W x 3 uint8 frames and H x W id masks -> T x 3 x H x W and T x H x W uint8 tensors, sized as frame 0
    (a frame or mask of another size, e.g. a mis-saved annotation, is resized to it)."""
    h, w = images[0].shape[:2]
    frames, masks = [], []
    for image, mask in zip(images, ids):
        if image.shape[:2] != (h, w):
            image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        if mask.shape != (h, w):
            mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
        frames.append(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        masks.append(torch.from_numpy(np.ascontiguousarray(mask)))
    return torch.stack(frames), torch.stack(masks)


def make_sample(
    images: torch.Tensor,
    ids: torch.Tensor,
    objects: Sequence[int],
    rng: np.random.Generator,
    augment: ClipAugment,
    max_objects: int,
    info: dict,
) -> dict:
    """Augment a raw clip and pack the sample dict; `objects` are already chosen (slot order = list order)."""
    images, ids = augment(images, ids, objects, rng)
    return pack_sample(images, ids, objects, max_objects, info)


# ------------------------------------------------------------------------------------------------------- datasets

class VOSTrainingDataset(Dataset):
    """3-frame training samples from real videos (Section III-E-2); see the module docstring for the format."""

    def __init__(
        self,
        sequences: Sequence[VideoSequence],
        *,
        max_gap: int | GapSchedule | Sequence[tuple[int, int]] = 10,
        crop_size: tuple[int, int] = (384, 384),
        max_objects: int = 2,
        num_frames: int = 3,
        seed: int = 0,
        length: int | None = None,
        batch_size: int = 1,
        augment: ClipAugment | None = None,
        max_short_side: int | None = 480,
        reverse_prob: float = 0.0,
        min_object_pixels: int = 16,
        distractor_prob: float = 0.0,
        name: str = "",
    ) -> None:
        self.schedule = as_schedule(max_gap)
        if min(g for _, g in self.schedule.steps) < num_frames - 1:
            raise LmrcError(f"max_gap must be >= {num_frames - 1} to hold {num_frames} different frames")
        usable = [s for s in sequences if len(s.annotated) >= num_frames]
        if not usable:
            raise LmrcError(f"no sequence has {num_frames} annotated frames; training needs clips of "
                            f"{num_frames} different annotated frames")
        self.sequences = usable
        self.num_frames, self.max_objects, self.seed = num_frames, max_objects, int(seed)
        self.length = int(length) if length is not None else len(usable)
        self.batch_size = max(1, int(batch_size))
        self.augment = augment if augment is not None else ClipAugment(crop_size=tuple(crop_size))
        self.max_short_side, self.reverse_prob = max_short_side, reverse_prob
        self.min_object_pixels, self.distractor_prob = min_object_pixels, distractor_prob
        self.name = name or (usable[0].dataset if usable[0].dataset else "video")
        self._order_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.length

    def max_gap_at(self, index: int) -> int:
        return self.schedule.at(index // self.batch_size)

    def sequence_for(self, index: int) -> VideoSequence:
        count = len(self.sequences)
        epoch = index // count
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, epoch_permutation(self.seed, epoch, count))
        return self.sequences[int(self._order_cache[1][index % count])]

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        rng = sample_rng(self.seed, index)
        seq, frame_idx, ids, candidates = self.draw_clip(index, rng)
        img, msk = self.load_clip(seq, frame_idx, ids)
        objects = choose_objects(candidates, self.max_objects, rng)
        if self.distractor_prob > 0:
            from lmrc.data.synthetic import maybe_paste_distractor  # synthetic builds on this module

            img, msk = maybe_paste_distractor(img, msk, objects, self.distractor_prob,
                                              sample_rng(self.seed, index, SALT_DISTRACTOR))
        info = {"name": seq.name, "frames": torch.tensor(frame_idx, dtype=torch.long), "source": self.name}
        return make_sample(img, msk, objects, rng, self.augment, self.max_objects, info)

    def draw_clip(self, index: int, rng: np.random.Generator, sequence: VideoSequence | None = None):
        """(sequence, frame indices, id masks, objects in frame 0) for sample `index` (or from `sequence`)."""
        seq = sequence if sequence is not None else self.sequence_for(index)
        picked = self.pick_clip(seq, self.max_gap_at(index), rng)
        for _ in range(5):
            if picked is not None:
                return (seq, *picked)
            # This sequence gave no clip with an object in its first frame (an object appearing late): another.
            seq = self.sequences[int(rng.integers(len(self.sequences)))]
            picked = self.pick_clip(seq, self.max_gap_at(index), rng)
        if picked is None:
            raise LmrcError(f"dataset {self.name}: no clip with an object in its first frame after several "
                            "sequences; check that the masks hold objects")
        return (seq, *picked)

    def load_clip(self, seq: VideoSequence, frame_idx: Sequence[int], ids: Sequence[np.ndarray]):
        """Frames + id masks as T x 3 x H x W / T x H x W uint8 tensors, shorter side capped at max_short_side."""
        images = [load_image(seq.frames[i]) for i in frame_idx]
        img, msk = stack_clip(images, ids)
        return resize_short_side(img, msk, self.max_short_side)

    def pick_clip(self, seq: VideoSequence, max_gap: int, rng: np.random.Generator, attempts: int = 5):
        """(frame indices, id masks, objects in frame 0) for a clip of `seq`, or None if no try had an object."""
        for _ in range(attempts):
            positions = choose_frames(len(seq.annotated), max_gap, rng, self.num_frames)
            frame_idx = [seq.annotated[p] for p in positions]
            if rng.random() < self.reverse_prob:
                frame_idx = frame_idx[::-1]  # played backwards the clip is still a valid video
            first = read_mask(seq.masks[frame_idx[0]])
            candidates = objects_present(first, self.min_object_pixels)
            if candidates:
                ids = [first] + [read_mask(seq.masks[i]) for i in frame_idx[1:]]
                return frame_idx, ids, candidates
        return None


class MixedDataset(Dataset):
    """Samples drawn from several datasets with weights; ``len`` = `length` (a fixed epoch length).

    Sample `i` comes from dataset k chosen by ``sample_rng(seed, i, SALT_MIX)`` with probability weight_k, and is
    ``datasets[k][i]`` (global index, so each child keeps its determinism and curriculum). Give the children
    different seeds.
    """

    def __init__(self, datasets: Sequence[Dataset], weights: Sequence[float], length: int, seed: int = 0) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("MixedDataset needs one weight per dataset and at least one dataset")
        weights = np.asarray(weights, dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"MixedDataset weights must be >= 0 and not all 0, got {weights.tolist()}")
        self.datasets = list(datasets)
        self.probabilities = weights / weights.sum()
        self.length, self.seed = int(length), int(seed)

    def __len__(self) -> int:
        return self.length

    def source_of(self, index: int) -> int:
        return int(sample_rng(self.seed, int(index), SALT_MIX).choice(len(self.datasets), p=self.probabilities))

    def __getitem__(self, index: int) -> dict:
        return self.datasets[self.source_of(index)][int(index)]
