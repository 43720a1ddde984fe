"""Copy and optical-flow baselines: warping, a synthetic moving square, the CLI, and a real DAVIS sequence."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from lmrc.cli import main as cli_main
from lmrc.data.masks import read_mask, write_mask
from lmrc.errors import LmrcError
from lmrc.eval.baselines import run_video, warp_backward
from lmrc.eval.davis import evaluate
from lmrc.eval.metrics import region_similarity

H, W, FRAMES, STEP = 96, 128, 10, 3


def moving_square(root: Path) -> tuple[Path, Path, list[np.ndarray]]:
    """Textured 24x24 square moving STEP px right a frame over a static textured background (PNG frames)."""
    rng = np.random.default_rng(1)
    background = cv2.GaussianBlur(rng.integers(0, 255, (H, W), dtype=np.uint8), (5, 5), 0)
    texture = cv2.GaussianBlur(rng.integers(0, 255, (24, 24), dtype=np.uint8), (3, 3), 0)
    frames_dir, masks = root / "frames", []
    frames_dir.mkdir(parents=True)
    for t in range(FRAMES):
        image, ids = background.copy(), np.zeros((H, W), np.uint8)
        left = 10 + STEP * t
        image[30:54, left : left + 24] = texture
        ids[30:54, left : left + 24] = 1
        cv2.imwrite(str(frames_dir / f"{t:05d}.png"), cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
        masks.append(ids)
    write_mask(root / "first.png", masks[0])
    return frames_dir, root / "first.png", masks


def test_warp_backward_takes_ids_from_where_pixels_came_from():
    ids = np.zeros((10, 12), np.uint8)
    ids[2:5, 6:9] = 3
    flow = np.zeros((10, 12, 2), np.float32)
    flow[..., 0] = 2  # every current pixel came from 2 px to its right in the previous frame
    warped = warp_backward(ids, flow)
    assert np.array_equal(warped, np.roll(ids, -2, axis=1))
    flow[..., 0] = 50  # from outside the image: background
    assert not warp_backward(ids, flow).any()


@pytest.mark.parametrize("flow", ["dis", "farneback"])
def test_flow_beats_copy_on_a_moving_square(tmp_path, flow):
    frames_dir, first, gt = moving_square(tmp_path)
    scores = {}
    for method in ("copy", "flow"):
        out = tmp_path / method
        assert run_video(method, frames_dir, first, out, flow=flow) == FRAMES
        pred = np.stack([read_mask(out / f"{t:05d}.png") for t in range(FRAMES)])
        assert np.array_equal(pred[0], gt[0])
        scores[method] = region_similarity(np.stack(gt) == 1, pred == 1)[1:].mean()
    # copy: overlap (24 - 3t) / (24 + 3t), mean 0.29 over frames 1..9. Flow follows the square, but backward
    # warping keeps the uncovered background behind it (static, zero flow) labelled: about 0.6.
    assert scores["copy"] < 0.35
    assert scores["flow"] > 0.5 and scores["flow"] > scores["copy"] + 0.2


def test_cli_single_video(tmp_path, capsys):
    frames_dir, first, _ = moving_square(tmp_path)
    out = tmp_path / "out"
    assert cli_main(["baseline", "copy", str(frames_dir), "--mask", str(first), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{t:05d}.png" for t in range(FRAMES)]
    assert "frames/s" in capsys.readouterr().out
    assert cli_main(["baseline", "copy", str(frames_dir), "--out", str(out)]) == 2  # no --mask
    assert "--mask" in capsys.readouterr().err


def test_refusals(tmp_path):
    frames_dir, first, _ = moving_square(tmp_path)
    small = tmp_path / "small.png"
    write_mask(small, np.zeros((H - 1, W), np.uint8))
    with pytest.raises(LmrcError, match=rf"small\.png is {W}x{H - 1} but frame .* is {W}x{H}"):
        run_video("copy", frames_dir, small, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmrcError, match="holds no .jpg/.png frames"):
        run_video("copy", tmp_path / "empty", first, tmp_path / "out")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(LmrcError, match="holds files other than masks"):
        run_video("copy", frames_dir, first, busy)
    assert (busy / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".*partial"))  # no half-written output left behind


def test_dataset_mode_then_eval(tmp_path, capsys):
    frames_dir, first, gt = moving_square(tmp_path / "src")
    root = tmp_path / "davis"
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("square\n")
    (root / "JPEGImages" / "480p").mkdir(parents=True)
    frames_dir.rename(root / "JPEGImages" / "480p" / "square")
    for t, ids in enumerate(gt):
        write_mask(root / "Annotations" / "480p" / "square" / f"{t:05d}.png", ids)
    out = tmp_path / "results"
    assert cli_main(["baseline", "flow", "--gt", str(root), "--out", str(out), "--workers", "1"]) == 0
    scores = evaluate(out, root, split="val", workers=1).global_scores()
    assert scores["J-Mean"] > 0.5


def test_copy_baseline_on_real_davis(davis2016, tmp_path):
    out = tmp_path / "copy"
    assert cli_main(["baseline", "copy", "--gt", str(davis2016), "--split", "train",
                     "--sequences", "soccerball", "--out", str(out), "--workers", "1"]) == 0
    scores = evaluate(out, davis2016, split="train", sequences=["soccerball"], workers=1).global_scores()
    # the ball moves away from where it started: far from perfect, yet not zero on the early frames
    assert 0.01 < scores["J&F-Mean"] < 0.6
    assert scores["J-Decay"] > 0
