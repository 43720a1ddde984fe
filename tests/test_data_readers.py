"""Dataset readers on tiny generated layouts (every format) and on the real DAVIS 2016 training split."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmrc.data.datasets import (
    VideoSequence,
    read_dataset,
    read_davis2016,
    read_davis2017,
    read_frame_folders,
    read_youtube_vos,
)
from lmrc.data.masks import write_mask
from lmrc.errors import LmrcError

REAL_DAVIS2016 = Path(__file__).resolve().parents[2] / "shared" / "data" / "davis2016"


def _frame(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 16, 3), value, np.uint8)).save(path)


def _ids(objects: tuple[int, ...]) -> np.ndarray:
    ids = np.zeros((12, 16), np.uint8)
    for k, obj in enumerate(objects):
        ids[2:6, 2 + 4 * k:5 + 4 * k] = obj
    return ids


def _palette_mask(path: Path, objects: tuple[int, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_mask(path, _ids(objects))


def make_davis2016(root: Path, seqs=("alpha", "beta"), frames=4) -> Path:
    lines = []
    for seq in seqs:
        for i in range(frames):
            _frame(root / "JPEGImages/480p" / seq / f"{i:05d}.jpg")
            mask = root / "Annotations/480p" / seq / f"{i:05d}.png"
            mask.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((_ids((1,)) * 255).astype(np.uint8), mode="L").save(mask)  # binary 0/255
            lines.append(f"/JPEGImages/480p/{seq}/{i:05d}.jpg /Annotations/480p/{seq}/{i:05d}.png")
    (root / "ImageSets/480p").mkdir(parents=True)
    (root / "ImageSets/480p/train.txt").write_text("\n".join(lines) + "\n")
    return root


def test_davis2016_pairs_file(tmp_path):
    seqs = read_davis2016(make_davis2016(tmp_path))
    assert [s.name for s in seqs] == ["alpha", "beta"]
    seq = seqs[0]
    assert isinstance(seq, VideoSequence)
    assert len(seq.frames) == 4 and sorted(seq.masks) == [0, 1, 2, 3]
    assert seq.frames[2].name == "00002.jpg" and seq.masks[2].name == "00002.png"
    assert seq.object_ids == (1,)
    assert [s.name for s in read_davis2016(tmp_path, split=None)] == ["alpha", "beta"]


def test_include_exclude(tmp_path):
    make_davis2016(tmp_path, seqs=("a", "b", "c"))
    assert [s.name for s in read_davis2016(tmp_path, include=["b", "c"])] == ["b", "c"]
    assert [s.name for s in read_davis2016(tmp_path, exclude=["b", "not-here"])] == ["a", "c"]
    with pytest.raises(LmrcError, match="zzz"):
        read_davis2016(tmp_path, include=["zzz"])
    with pytest.raises(LmrcError, match="no sequence"):
        read_davis2016(tmp_path, exclude=["a", "b", "c"])


def test_davis2017_palette_objects(tmp_path):
    for seq, objects in (("two", (1, 2)), ("three", (1, 2, 3)), ("skipped", (1,))):
        for i in range(3):
            _frame(tmp_path / "JPEGImages/480p" / seq / f"{i:05d}.jpg")
            _palette_mask(tmp_path / "Annotations/480p" / seq / f"{i:05d}.png", objects)
    (tmp_path / "ImageSets/2017").mkdir(parents=True)
    (tmp_path / "ImageSets/2017/train.txt").write_text("two\nthree\n")
    seqs = read_davis2017(tmp_path)
    assert [(s.name, s.object_ids) for s in seqs] == [("two", (1, 2)), ("three", (1, 2, 3))]
    assert len(read_dataset("davis2017", tmp_path, split=None)) == 3


def test_youtube_vos_sparse_annotations_and_meta(tmp_path):
    for vid in ("v1", "v2"):
        for i in range(0, 15):
            _frame(tmp_path / "JPEGImages" / vid / f"{i:05d}.jpg")
        for i in range(0, 15, 5):
            _palette_mask(tmp_path / "Annotations" / vid / f"{i:05d}.png", (1,))
    seqs = read_youtube_vos(tmp_path)
    assert len(seqs[0].frames) == 15 and seqs[0].annotated == [0, 5, 10]
    assert seqs[0].object_ids == (1,)  # no meta.json: from the first mask
    meta = {"videos": {"v1": {"objects": {"1": {"category": "cat", "frames": ["00000"]},
                                          "3": {"category": "dog", "frames": ["00010"]}}}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    seqs = read_youtube_vos(tmp_path, include=["v1"])
    assert seqs[0].object_ids == (1, 3)


@pytest.mark.parametrize("layout", ["jpegimages", "per-sequence"])
def test_generic_frame_folders(tmp_path, layout):
    for i in range(3):
        if layout == "jpegimages":
            frame, mask = tmp_path / "JPEGImages/clip" / f"f{i}.png", tmp_path / "Annotations/clip" / f"f{i}.png"
        else:
            frame, mask = tmp_path / "clip/images" / f"f{i}.jpg", tmp_path / "clip/masks" / f"f{i}.png"
        _frame(frame)
        if i != 1:  # a frame without a mask is kept as a frame, not as an annotation
            _palette_mask(mask, (2,))
    (seq,) = read_frame_folders(tmp_path)
    assert seq.name == "clip" and len(seq.frames) == 3 and seq.annotated == [0, 2] and seq.object_ids == (2,)


def test_missing_path_is_a_clear_error(tmp_path):
    for reader in (read_davis2016, read_davis2017, read_youtube_vos, read_frame_folders):
        with pytest.raises(LmrcError, match="does not exist"):
            reader(tmp_path / "nowhere")


def test_empty_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(LmrcError, match="no sequence"):
        read_frame_folders(tmp_path)
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(LmrcError, match="no sequence"):
        read_youtube_vos(tmp_path)
    with pytest.raises(LmrcError, match="train.txt"):
        read_davis2016(tmp_path)


def test_frames_without_masks_is_a_clear_error(tmp_path):
    for i in range(3):
        _frame(tmp_path / "JPEGImages" / "lonely" / f"{i:05d}.jpg")
    with pytest.raises(LmrcError, match=r"lonely.*no masks.*Annotations"):
        read_youtube_vos(tmp_path)
    with pytest.raises(LmrcError, match="no masks"):
        read_frame_folders(tmp_path)


def test_unknown_kind(tmp_path):
    with pytest.raises(LmrcError, match="davis2017"):
        read_dataset("kinetics", tmp_path)


def test_real_davis2016_train_split():
    if not REAL_DAVIS2016.is_dir():
        pytest.skip(f"real DAVIS 2016 data not found at {REAL_DAVIS2016}")
    seqs = read_davis2016(REAL_DAVIS2016)
    assert len(seqs) == 23
    assert sum(len(s.frames) for s in seqs) == 1600
    for seq in seqs:
        assert sorted(seq.masks) == list(range(len(seq.frames)))  # every frame annotated
        assert seq.object_ids == (1,)
        assert all(p.is_file() for p in seq.frames[:1] + [seq.masks[0]])
    held_out = read_davis2016(REAL_DAVIS2016, exclude=["bear", "surf"])
    assert len(held_out) == 21 and "bear" not in {s.name for s in held_out}
