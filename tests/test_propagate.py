"""Propagation both ways (`lmrc.inference.propagate`): a mask given at a middle frame segments the frames before it
too, with the shipped lmrc-lite weights on a synthetic moving-square clip; the backward pass is the forward
segmenter run over the reversed frames; frames read from a folder (buffered, also spilled to disk) give the same
result; `lmrc segment` does it for --mask and --box, and keeps written masks when a corrupt frame stops it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmrc.cli import main as cli
from lmrc.data.masks import davis_palette, read_mask
from lmrc.errors import LmrcError
from lmrc.inference.propagate import propagate, propagate_frames
from lmrc.model.weights import default_weights_path, load_model

H, W, COUNT, SIZE = 96, 128, 8, 240
PROMPT = 5
# Measured on this clip (SIZE 240): IoU 0.92-0.97 on every frame, forward and backward (0.29-0.70 at size 96).
MIN_IOU = 0.85


@pytest.fixture(scope="module")
def model():
    if default_weights_path("lmrc-lite") is None:
        pytest.skip("no weights/lmrc-lite.safetensors in this checkout")
    return load_model("lmrc-lite")


def clip(objects: int = 1) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A red square with a yellow centre moving right 4 px a frame over a blurred noise background (and, with
    objects=2, a still blue square, object 2) -> frames, true ids."""
    import cv2

    rng = np.random.default_rng(3)
    background = cv2.GaussianBlur(np.clip(rng.normal(90, 30, (H, W, 3)), 0, 255).astype(np.uint8), (5, 5), 0)
    frames, truth = [], []
    for t in range(COUNT):
        frame, ids = background.copy(), np.zeros((H, W), np.uint8)
        x = 20 + 4 * t
        frame[30:58, x:x + 28] = (230, 60, 40)
        frame[38:50, x + 8:x + 20] = (250, 220, 60)
        ids[30:58, x:x + 28] = 1
        if objects == 2:
            frame[66:88, 90:116] = (40, 70, 230)
            ids[66:88, 90:116] = 2
        frames.append(frame)
        truth.append(ids)
    return frames, truth


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_mask_at_a_middle_frame_segments_the_frames_before_it(model):
    frames, truth = clip()
    results = list(propagate(model, frames, {PROMPT: truth[PROMPT]}, size=SIZE))
    assert [index for index, _ in results] == list(range(COUNT))
    for index, ids in results:
        assert ids.dtype == np.uint8 and ids.shape == (H, W)
        assert iou(ids == 1, truth[index] == 1) >= MIN_IOU, index
    np.testing.assert_array_equal(results[PROMPT][1], truth[PROMPT])


def test_backward_pass_is_the_segmenter_over_reversed_frames(model):
    from lmrc.inference.segmenter import Segmenter, output_prob_to_mask

    frames, truth = clip()
    both = dict(propagate(model, frames, {PROMPT: truth[PROMPT]}, size=SIZE, mem_every=2))
    seg = Segmenter(model, size=SIZE, mem_every=2)
    for index in range(PROMPT, -1, -1):
        probs = seg.step(frames[index], truth[PROMPT] if index == PROMPT else None)
        expected = output_prob_to_mask(probs, seg.object_ids)
        # Backward results are kept as uint8 probabilities until written: only near-ties may differ.
        assert (both[index] != expected).mean() < 0.002, index
    seg.reset()
    for index in range(PROMPT, COUNT):
        probs = seg.step(frames[index], truth[PROMPT] if index == PROMPT else None)
        np.testing.assert_array_equal(both[index], output_prob_to_mask(probs, seg.object_ids))


def test_objects_joining_at_different_frames_are_each_tracked_over_the_whole_video(model):
    frames, truth = clip(objects=2)
    first = np.where(truth[0] == 1, 1, 0).astype(np.uint8)  # object 1 given at frame 0
    later = np.where(truth[PROMPT] == 2, 2, 0).astype(np.uint8)  # object 2 only at frame 5
    results = list(propagate_frames(model, frames, {0: first, PROMPT: later}, size=SIZE))
    assert [r.direction for r in results] == ["both"] * PROMPT + ["forward"] * (COUNT - PROMPT)
    for r in results:
        assert r.object_ids == [1, 2] and r.probs.shape == (3, H, W)
        for object_id in (1, 2):
            assert iou(r.ids == object_id, truth[r.index] == object_id) >= MIN_IOU, (r.index, object_id)


def test_forward_only_leaves_late_objects_out_before_their_first_mask(model):
    frames, truth = clip(objects=2)
    first = np.where(truth[0] == 1, 1, 0).astype(np.uint8)
    later = np.where(truth[PROMPT] == 2, 2, 0).astype(np.uint8)
    results = list(propagate_frames(model, frames, {0: first, PROMPT: later}, size=48, backward=False))
    assert [r.direction for r in results] == ["forward"] * COUNT
    assert not any((r.ids == 2).any() for r in results[:PROMPT])
    assert (results[PROMPT].ids == 2).any()


def test_frame_folder_buffered_or_spilled_to_disk_matches_a_list(model, tmp_path):
    from lmrc.data.video import open_frames

    frames, truth = clip()
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"{t:05d}.png")
    expected = list(propagate(model, frames, {PROMPT: truth[PROMPT]}, size=48))
    for buffer_bytes in (1 << 30, 0):  # 0: every buffered frame and result goes through a .npy file
        steps = []
        got = list(propagate(model, open_frames(tmp_path), {PROMPT: truth[PROMPT]}, size=48,
                             buffer_bytes=buffer_bytes, on_step=lambda done, total: steps.append((done, total))))
        assert [i for i, _ in got] == list(range(COUNT))
        for (_, a), (_, b) in zip(got, expected):
            np.testing.assert_array_equal(a, b)
        assert steps[-1] == (PROMPT + 1 + COUNT - PROMPT, PROMPT + 1 + COUNT - PROMPT)


def test_prompt_errors(model):
    frames, truth = clip()
    with pytest.raises(LmrcError, match="no prompt"):
        list(propagate(model, frames, {}))
    with pytest.raises(LmrcError, match="only background"):
        list(propagate(model, frames, {2: np.zeros((H, W), np.uint8)}))
    with pytest.raises(LmrcError, match="names frame 20"):
        list(propagate(model, frames, {20: truth[0]}, size=48))


def _save_clip(folder: Path) -> list[np.ndarray]:
    frames, truth = clip()
    folder.mkdir()
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{t:05d}.png")
    return truth


def _palette_png(path: Path, ids: np.ndarray) -> Path:
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(davis_palette().reshape(-1).tolist())
    image.save(path)
    return path


def test_cli_mask_after_frame_zero_fills_the_frames_before(model, tmp_path, capsys):
    truth = _save_clip(tmp_path / "clip")
    mask = _palette_png(tmp_path / f"{PROMPT:05d}.png", truth[PROMPT])  # named like frame 5
    out = tmp_path / "out"
    assert cli(["segment", str(tmp_path / "clip"), "--mask", str(mask), "--size", str(SIZE), "--out", str(out)]) == 0
    assert "segmented 8 frames (1 objects)" in capsys.readouterr().out
    for t in range(COUNT):
        assert iou(read_mask(out / f"{t:05d}.png") == 1, truth[t] == 1) >= MIN_IOU, t
    # --forward-only: as before this change, the frames before the mask stay empty.
    assert cli(["segment", str(tmp_path / "clip"), "--mask", str(mask), "--size", "48", "--out", str(out),
                "--overwrite", "--forward-only"]) == 0
    assert not any(read_mask(out / f"{t:05d}.png").any() for t in range(PROMPT))


def test_cli_box_on_a_prompt_frame(model, tmp_path, capsys):
    truth = _save_clip(tmp_path / "clip")
    ys, xs = np.nonzero(truth[PROMPT])
    box = f"{xs.min() - 3},{ys.min() - 3},{xs.max() + 4},{ys.max() + 4}"
    out = tmp_path / "out"
    code = cli(["segment", str(tmp_path / "clip"), "--box", box, "--prompt-frame", str(PROMPT), "--size", str(SIZE),
                "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    for t in range(COUNT):
        assert iou(read_mask(out / f"{t:05d}.png") == 1, truth[t] == 1) >= MIN_IOU, t


def test_corrupt_frame_keeps_the_masks_written_and_says_how_to_go_on(tmp_path, capsys):
    # Any weights do for this: an untrained model saved to a file.
    import torch

    from lmrc.config import model_config
    from lmrc.model.network import LMRC
    from lmrc.model.weights import save_weights

    torch.manual_seed(0)
    weights = tmp_path / "lite.safetensors"
    save_weights(LMRC(model_config("lmrc-lite"), pretrained_backbone=False), weights)
    folder = tmp_path / "clip"
    truth = _save_clip(folder)
    for t in range(COUNT):  # JPEG frames, the usual kind; frame 4 cut short mid-stream
        Image.open(folder / f"{t:05d}.png").convert("RGB").save(folder / f"{t:05d}.jpg", quality=90)
        (folder / f"{t:05d}.png").unlink()
    data = (folder / "00004.jpg").read_bytes()
    (folder / "00004.jpg").write_bytes(data[: len(data) // 3])
    mask = _palette_png(tmp_path / "00000.png", truth[0])
    out = tmp_path / "out"
    argv = ["segment", str(folder), "--mask", str(mask), "--weights", str(weights), "--size", "32", "--out", str(out)]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "frame 4" in err and "00004.jpg" in err and "--resume" in err and "--skip-bad-frames" in err
    assert f"masks of the 4 frames finished before it are kept in {out}" in err
    assert sorted(p.name for p in out.glob("*.png")) == [f"{t:05d}.png" for t in range(4)]
    # The advice works: resume past the bad frame.
    assert cli([*argv, "--resume", "--skip-bad-frames"]) == 0
    assert len(list(out.glob("*.png"))) == COUNT - 1


def test_other_errors_after_written_frames_say_what_is_kept_without_bad_frame_advice(tmp_path):
    import torch

    from lmrc.config import model_config
    from lmrc.inference.io import Prompts
    from lmrc.inference.run import segment_sequence
    from lmrc.model.network import LMRC

    torch.manual_seed(0)
    model = LMRC(model_config("lmrc-lite"), pretrained_backbone=False).eval()
    folder = tmp_path / "clip"
    truth = _save_clip(folder)
    first = (truth[0] > 0).astype(np.uint8)
    # a mask naming a frame past the video's end: found only when the video ends, after every frame was written
    prompts = Prompts({0: first, COUNT + 5: first}, [1], {1: 0})
    out = tmp_path / "out"
    with pytest.raises(LmrcError) as caught:
        segment_sequence(model, folder, prompts, out, size=32, precision="fp32")
    message = str(caught.value)
    assert f"frame {COUNT + 5}" in message and f"masks of the {COUNT} frames finished before it are kept" in message
    assert "--skip-bad-frames" not in message  # the advice is for bad frames only
    assert len(list(out.glob("*.png"))) == COUNT
