"""The "video file + per-frame masks" dataset kind (read_video_masks) and single images + masks (read_image_masks),
on tiny generated data (PyAV writes the videos) and, where present, on the shared folders."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmrc.data.datasets import VOSTrainingDataset, load_image, read_dataset, read_image_masks, read_video_masks
from lmrc.data.masks import read_mask, write_mask
from lmrc.errors import LmrcError

# ../shared/data beside the repository, or $LMRC_SHARED_DATA (e.g. from a git worktree elsewhere)
SHARED = Path(os.environ.get("LMRC_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
H, W = 48, 64


def _frames(count: int) -> list[np.ndarray]:
    """Flat colour blocks moving right: large smooth areas survive lossy coding with small error."""
    out = []
    for t in range(count):
        frame = np.full((H, W, 3), 40, np.uint8)
        frame[8:32, 4 + 4 * t:28 + 4 * t] = (220, 60, 60)
        out.append(frame)
    return out


def write_video(path: Path, frames: list[np.ndarray]) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"qscale": "1"}
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_video_masks(root: Path, name: str = "clip", count: int = 5, *, masks: int | None = None,
                     mask_size: tuple[int, int] = (H, W), binary: bool = False) -> Path:
    frames = _frames(count)
    write_video(root / "Videos" / f"{name}.mp4", frames)
    for t in range(count if masks is None else masks):
        ids = np.zeros(mask_size, np.uint8)
        ids[8:32, 4 + 4 * t:28 + 4 * t] = 1
        ids[36:44, 40:60] = 0 if binary else 2
        path = root / "Annotations" / name / f"{t:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if binary:
            Image.fromarray(ids * 255, mode="L").save(path)
        else:
            write_mask(path, ids)
    return root


def test_video_masks_decode_once_into_a_frame_cache(tmp_path):
    root = make_video_masks(tmp_path / "data")
    cache = tmp_path / "cache"
    (seq,) = read_dataset("video_masks", root, cache_dir=cache)
    assert seq.name == "clip" and len(seq.frames) == 5 and seq.annotated == [0, 1, 2, 3, 4]
    assert seq.object_ids == (1, 2)
    frames = _frames(5)
    for t in (0, 3):  # frame i of the cache is decoded frame i (the block has moved 4 px per frame)
        decoded = load_image(seq.frames[t]).astype(int)
        assert decoded.shape == (H, W, 3)
        assert np.abs(decoded - frames[t]).mean() < 4
    first = [p.stat().st_mtime_ns for p in seq.frames]
    (again,) = read_video_masks(root, cache_dir=cache)  # a second read reuses the cache: no new decode
    assert again.frames == seq.frames and [p.stat().st_mtime_ns for p in again.frames] == first
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_video_masks_binary_masks_are_one_object_and_train(tmp_path):
    root = make_video_masks(tmp_path / "data", binary=True)
    (seq,) = read_video_masks(root, cache_dir=tmp_path / "cache")
    assert seq.object_ids == (1,)
    sample = VOSTrainingDataset([seq], max_gap=4, crop_size=(32, 32), max_objects=1)[0]
    assert sample["images"].shape == (3, 3, 32, 32) and bool(sample["valid_objects"][0])


@pytest.mark.parametrize("problem", ["fewer_masks", "mask_size", "bad_video", "mask_name"])
def test_video_masks_problems_are_one_clear_error_naming_the_file(tmp_path, problem):
    root = tmp_path / "data"
    if problem == "fewer_masks":
        make_video_masks(root, masks=4)
        expected = "4 masks but video"
    elif problem == "mask_size":
        make_video_masks(root, mask_size=(40, 64))
        expected = "00000.png is 64x40 but video"
    elif problem == "bad_video":
        make_video_masks(root)
        (root / "Videos" / "clip.mp4").write_bytes(b"not a video at all")
        expected = "clip.mp4"
    else:
        make_video_masks(root)
        (root / "Annotations" / "clip" / "00004.png").rename(root / "Annotations" / "clip" / "last.png")
        expected = "last.png is not named by its frame index"
    with pytest.raises(LmrcError, match=expected):
        read_video_masks(root, cache_dir=tmp_path / "cache")


def test_image_masks_pairs_and_missing_mask(tmp_path):
    for stem in ("a", "b"):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "masks").mkdir(exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / f"{stem}.jpg")
        Image.fromarray(np.full((8, 8), 255, np.uint8), mode="L").save(tmp_path / "masks" / f"{stem}.png")
    pairs = read_image_masks(tmp_path, exclude=["b"])
    assert pairs == [(tmp_path / "images" / "a.jpg", tmp_path / "masks" / "a.png")]
    (tmp_path / "masks" / "b.png").unlink()
    with pytest.raises(LmrcError, match="b.jpg has no mask"):
        read_image_masks(tmp_path)


@pytest.mark.parametrize("folder,count,objects", [("davis2017_pair", 2, None), ("davis2016_video", 7, (1,))])
def test_shared_video_mask_folders(tmp_path, folder, count, objects):
    root = SHARED / folder
    if not (root / "Videos").is_dir():
        pytest.skip(f"shared data {root} not found")
    # Decoding every video takes ~10 s per 100 frames here: read the smallest one, list the rest by name only.
    videos = sorted((root / "Videos").iterdir(), key=lambda p: p.stat().st_size)
    assert len(videos) == count
    (seq,) = read_video_masks(root, include=[videos[0].stem], cache_dir=tmp_path / "cache")
    assert len(seq.frames) == len(list((root / "Annotations" / seq.name).glob("*.png")))
    assert load_image(seq.frames[-1]).shape[:2] == read_mask(seq.masks[len(seq.frames) - 1]).shape
    if objects is not None:
        assert seq.object_ids == objects
    else:
        assert len(seq.object_ids) >= 3


def test_shared_sod_images():
    root = SHARED / "sod"
    if not (root / "images").is_dir():
        pytest.skip(f"shared data {root} not found")
    pairs = read_image_masks(root)
    assert len(pairs) == 300
    assert read_mask(pairs[0][1]).max() == 1
