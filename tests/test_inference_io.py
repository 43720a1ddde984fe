"""Prompts, result masks, soft maps and the overlay video of `lmrc segment` (`lmrc.inference.io`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmrc.data.masks import davis_palette, read_mask
from lmrc.data.video import LmrcWarning, open_frames
from lmrc.errors import LmrcError
from lmrc.inference.io import OverlayWriter, ResultWriter, load_prompts, overlay

H, W = 48, 64
NAMES = [f"{i:05d}" for i in range(10)]
# The shared data sits beside the project (`../shared/data`); tests that need it skip where it is absent.
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def palette_png(path: Path, ids: np.ndarray, colours: int = 256) -> Path:
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(davis_palette()[:colours].reshape(-1).tolist())
    image.save(path)
    return path


def blob(object_id: int = 1, h: int = H, w: int = W) -> np.ndarray:
    ids = np.zeros((h, w), np.uint8)
    ids[10:20, 5 + 10 * object_id: 12 + 10 * object_id] = object_id
    return ids


# -- prompts ---------------------------------------------------------------------------------------------------------
def test_palette_png_prompt_on_frame_zero(tmp_path):
    ids = blob(1) | blob(3)
    prompts = load_prompts(palette_png(tmp_path / "first.png", ids), NAMES, (H, W))
    assert list(prompts.masks) == [0]
    np.testing.assert_array_equal(prompts.masks[0], ids)
    assert prompts.object_ids == [1, 3] and prompts.first_frame == {1: 0, 3: 0}
    assert prompts.warnings == []


def test_binary_png_prompt_matches_frame_by_name(tmp_path):
    gray = (blob(1) > 0).astype(np.uint8) * 255
    Image.fromarray(gray, mode="L").save(tmp_path / "00004.png")
    prompts = load_prompts(tmp_path / "00004.png", NAMES, (H, W))
    assert list(prompts.masks) == [4]
    assert prompts.object_ids == [1] and set(np.unique(prompts.masks[4])) == {0, 1}


def test_sparse_folder_with_frame_source(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for name in NAMES:
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(frames / f"{name}.jpg")
    masks = tmp_path / "masks"
    masks.mkdir()
    palette_png(masks / "00000.png", blob(1))
    palette_png(masks / "00006.png", blob(1) | blob(2))
    prompts = load_prompts(masks, open_frames(frames))
    assert sorted(prompts.masks) == [0, 6]
    assert prompts.first_frame == {1: 0, 2: 6}
    assert prompts.new_objects(6) == [2] and prompts.files[6] == masks / "00006.png"


def test_sparse_folder_for_a_video_maps_numbers_to_indices(tmp_path):
    av = pytest.importorskip("av")
    from fractions import Fraction

    path = tmp_path / "clip.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=Fraction(10))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for _ in range(6):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((H, W, 3), np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    masks = tmp_path / "masks"
    masks.mkdir()
    palette_png(masks / "0.png", blob(1))
    palette_png(masks / "00003.png", blob(2))
    prompts = load_prompts(masks, open_frames(path))
    assert prompts.first_frame == {1: 0, 2: 3}


def test_cutie_judo_sparse_masks():
    root = DATA / "cutie_examples"
    if not root.is_dir():
        pytest.skip(f"{root} not found: the real-data prompt test needs cutie_examples")
    frames = open_frames(root / "JPEGImages" / "480p" / "judo")
    with pytest.warns(LmrcWarning, match="00005.png is 853x480 but the frames are 854x480"):
        prompts = load_prompts(root / "Annotations" / "480p" / "judo", frames)
    assert prompts.object_ids == [1, 2, 3, 4]
    assert prompts.first_frame == {1: 0, 2: 5, 3: 8, 4: 13}
    assert all(m.shape == (480, 854) for m in prompts.masks.values())
    assert set(np.unique(prompts.masks[5])) == {0, 2}


def test_davis2016_binary_mask():
    root = DATA / "davis2016"
    if not root.is_dir():
        pytest.skip(f"{root} not found: the real-data prompt test needs davis2016")
    frames = open_frames(root / "JPEGImages" / "480p" / "bear")
    prompts = load_prompts(root / "Annotations" / "480p" / "bear" / "00000.png", frames)
    assert list(prompts.masks) == [0] and prompts.object_ids == [1]
    assert prompts.masks[0].shape == (480, 854)


def test_slightly_off_mask_is_resized_with_warning(tmp_path):
    path = palette_png(tmp_path / "m.png", blob(1, H, W - 1))
    with pytest.warns(LmrcWarning, match="63x48 but the frames are 64x48; resized"):
        prompts = load_prompts(path, NAMES, (H, W))
    assert prompts.masks[0].shape == (H, W) and prompts.masks[0].max() == 1
    assert len(prompts.warnings) == 1


def test_prompt_errors(tmp_path):
    with pytest.raises(LmrcError, match="not found"):
        load_prompts(tmp_path / "nope.png", NAMES, (H, W))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(LmrcError, match="cannot be read"):
        load_prompts(tmp_path / "text.png", NAMES, (H, W))
    with pytest.raises(LmrcError, match=r"is 64x24 but the frames are 64x48"):
        load_prompts(palette_png(tmp_path / "small.png", blob(1, H // 2, W)), NAMES, (H, W))
    with pytest.raises(LmrcError, match=r"48x64 but the frames are 64x48 \(rotated\?\)"):
        load_prompts(palette_png(tmp_path / "rot.png", blob(1, W, H)), NAMES, (H, W))
    with pytest.raises(LmrcError, match="empty"):
        load_prompts(palette_png(tmp_path / "empty.png", np.zeros((H, W), np.uint8)), NAMES, (H, W))
    with pytest.raises(LmrcError, match="ids must be 1..2"):
        load_prompts(palette_png(tmp_path / "many.png", blob(3)), NAMES, (H, W), max_id=2)

    folder = tmp_path / "masks"
    folder.mkdir()
    with pytest.raises(LmrcError, match="holds no PNG masks"):
        load_prompts(folder, NAMES, (H, W))
    palette_png(folder / "00000.png", blob(1))
    palette_png(folder / "frame_x.png", blob(2))
    with pytest.raises(LmrcError, match="frame_x.png names no frame"):
        load_prompts(folder, NAMES, (H, W))
    (folder / "frame_x.png").unlink()
    palette_png(folder / "00002.png", np.zeros((H, W), np.uint8))
    with pytest.raises(LmrcError, match="00002.png is empty"):
        load_prompts(folder, NAMES, (H, W))


def test_dense_annotation_folder_warns(tmp_path):
    for name in NAMES:
        palette_png(tmp_path / f"{name}.png", blob(1))
    with pytest.warns(LmrcWarning, match="masks for 10 of 10 frames"):
        prompts = load_prompts(tmp_path, NAMES, (H, W))
    assert len(prompts.masks) == 10


# -- result writer ---------------------------------------------------------------------------------------------------
def test_palette_masks_are_read_by_their_indices_whatever_the_palette(tmp_path):
    # A palette of 3 colours (ids 0..2) and id 3 in the pixels: Pillow keeps the value in a 4-bit PNG; the DAVIS
    # evaluator and Cutie read the index, and so does lmrc, silently.
    cut = tmp_path / "cut.png"
    palette_png(cut, blob(3), colours=3)
    with Image.open(cut) as image:
        assert np.array(image).max() == 3 and len(image.getpalette()) == 9
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(load_prompts(cut, NAMES, (H, W)).masks[0], blob(3))
    # The common Python way: no palette at all (Pillow saves a one-colour palette).
    plain = tmp_path / "plain.png"
    Image.fromarray(blob(1).astype(np.uint8), mode="P").save(plain)
    with Image.open(plain) as image:
        assert image.mode == "P" and len(image.getpalette()) == 3
    prompts = load_prompts(plain, NAMES, (H, W))
    assert prompts.object_ids == [1]
    np.testing.assert_array_equal(prompts.masks[0], blob(1))


def test_writer_writes_palette_masks_and_probs(tmp_path):
    out = tmp_path / "out"
    writer = ResultWriter(out, save_probs=True, size=(H, W))
    probs = np.stack([np.full((H, W), 0.25), np.full((H, W), 0.5)])
    writer.write("00000", blob(1) | blob(2), probs=probs, object_ids=[1, 2])
    with Image.open(out / "00000.png") as image:
        assert image.mode == "P"
    np.testing.assert_array_equal(read_mask(out / "00000.png"), blob(1) | blob(2))
    stored = np.load(out / "probs" / "00000.npz")
    assert stored["probs"].dtype == np.uint8 and stored["probs"].shape == (2, H, W)
    assert stored["probs"][1, 0, 0] == 128 and list(stored["object_ids"]) == [1, 2]
    assert not list(out.glob(".*")) and not list((out / "probs").glob(".*"))
    with pytest.raises(ValueError, match="K x H x W"):
        writer.write("00001", blob(1), probs=probs[:1], object_ids=[1, 2])
    with pytest.raises(ValueError, match="0..254"):
        writer.write("00001", np.full((H, W), 255, np.uint8), probs=probs, object_ids=[1, 2])
    assert not (out / "00001.png").exists()


def test_writer_refuses_results_unless_overwrite_or_resume(tmp_path):
    out = tmp_path / "out"
    first = ResultWriter(out)
    for name in NAMES[:4]:
        first.write(name, blob(1))
    with pytest.raises(LmrcError, match="already holds 4 result masks.*--overwrite.*--resume"):
        ResultWriter(out)
    with pytest.raises(LmrcError, match="exclude each other"):
        ResultWriter(out, overwrite=True, resume=True)

    resumed = ResultWriter(out, resume=True)
    assert [resumed.done(n) for n in NAMES[:5]] == [True] * 4 + [False]
    np.testing.assert_array_equal(resumed.load("00002"), blob(1))
    resumed.write("00004", blob(2))
    assert resumed.done("00004")

    ResultWriter(out, overwrite=True)  # old results go at once: a new run never mixes with an old one
    assert not list(out.glob("*.png"))


def test_writer_never_takes_a_folder_of_frames(tmp_path):
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "00000.png")
    for mode in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(LmrcError, match="not an lmrc result mask"):
            ResultWriter(tmp_path, **mode)
    assert (tmp_path / "00000.png").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(LmrcError, match="is a file"):
        ResultWriter(tmp_path / "file")


def test_resume_clears_leftover_temporary_files(tmp_path):
    ResultWriter(tmp_path).write("00000", blob(1))
    leftover = tmp_path / ".00001.png.abc123.tmp.png"
    leftover.write_bytes(b"half")
    writer = ResultWriter(tmp_path, resume=True)
    assert not leftover.exists() and writer.done("00000") and not writer.done("00001")


def test_resume_with_probs_needs_the_old_probs(tmp_path):
    ResultWriter(tmp_path).write("00000", blob(1))
    with pytest.raises(LmrcError, match="no soft maps"):
        ResultWriter(tmp_path, resume=True, save_probs=True)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    writer = ResultWriter(tmp_path / "out")

    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        writer.write("00000", blob(1))
    assert list((tmp_path / "out").iterdir()) == []
    assert not writer.done("00000")


# -- overlay ---------------------------------------------------------------------------------------------------------
def test_overlay_blend_colours_objects_only():
    rgb = np.full((H, W, 3), 100, np.uint8)
    ids = blob(1)
    out = overlay(rgb, ids)
    assert (out[ids == 0] == 100).all()
    inside = out[15, 20]  # interior of object 1, colour (128, 0, 0)
    np.testing.assert_array_equal(inside, [114, 50, 50])


def read_video(path: Path) -> list[np.ndarray]:
    av = pytest.importorskip("av")
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


@pytest.mark.parametrize("size", [(H, W), (H - 1, W - 1)])
def test_overlay_video_round_trip(tmp_path, size):
    path = tmp_path / "overlay.mp4"
    h, w = size
    with OverlayWriter(path, fps=12.5, size=size) as writer:
        assert not path.exists()  # written under a temporary name until closed
        for i in range(7):
            ids = np.zeros(size, np.uint8)
            ids[5:25, 2 * i: 2 * i + 20] = 1 + i % 2
            writer.write(np.full((h, w, 3), 90, np.uint8), ids)
    frames = read_video(path)
    assert len(frames) == 7
    assert frames[0].shape[:2] == (h + h % 2, w + w % 2)
    assert not [p for p in tmp_path.iterdir() if p.name != "overlay.mp4"]


def test_overlay_aborted_on_exception_leaves_nothing(tmp_path):
    path = tmp_path / "overlay.mp4"
    with pytest.raises(RuntimeError, match="segmenter failed"):
        with OverlayWriter(path, fps=10, size=(H, W)) as writer:
            writer.write(np.zeros((H, W, 3), np.uint8), blob(1))
            raise RuntimeError("segmenter failed")
    assert list(tmp_path.iterdir()) == []


def test_overlay_errors(tmp_path):
    (tmp_path / "old.mp4").write_bytes(b"old")
    with pytest.raises(LmrcError, match="already exists"):
        OverlayWriter(tmp_path / "old.mp4", fps=10, size=(H, W))
    with OverlayWriter(tmp_path / "old.mp4", fps=10, size=(H, W), overwrite=True) as writer:
        writer.write(np.zeros((H, W, 3), np.uint8), blob(1))
    assert len(read_video(tmp_path / "old.mp4")) == 1
    with pytest.raises(LmrcError, match=r"\.mp4"):
        OverlayWriter(tmp_path / "x.gif", fps=10, size=(H, W))
    with pytest.warns(LmrcWarning, match="no frames"):
        with OverlayWriter(tmp_path / "empty.mp4", fps=10, size=(H, W)):
            pass
    assert not (tmp_path / "empty.mp4").exists()
