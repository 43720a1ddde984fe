"""YouTube-VOS: meta.json, where objects start, frame selection and the submission zip."""
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmrc.cli import main as cli_main
from lmrc.data.masks import read_mask, write_mask
from lmrc.errors import LmrcError
from lmrc.eval.youtube_vos import benchmark_frames, first_frames, prepare_submission, read_meta

H, W = 24, 32
SCORED = ["00000", "00005", "00010"]  # every 5th frame, as in valid/JPEGImages
ALL = [f"{t:05d}" for t in range(11)]


def make_valid(root: Path) -> Path:
    """Two videos; in "b" object 2 enters at frame 00005."""
    meta = {"videos": {
        "a": {"objects": {"1": {"category": "cat", "frames": SCORED}}},
        "b": {"objects": {"1": {"category": "dog", "frames": SCORED}, "2": {"category": "ball", "frames": SCORED[1:]}}},
    }}
    root.mkdir(parents=True)
    (root / "meta.json").write_text(json.dumps(meta))
    for video in ("a", "b"):
        for frame in SCORED:
            path = root / "JPEGImages" / video / f"{frame}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (W, H)).save(path)
        first = np.zeros((H, W), np.uint8)
        first[2:8, 2:8] = 1
        write_mask(root / "Annotations" / video / "00000.png", first)
    later = np.zeros((H, W), np.uint8)
    later[10:16, 10:16] = 2
    write_mask(root / "Annotations" / "b" / "00005.png", later)
    return root


def make_predictions(root: Path, frames=ALL) -> Path:
    for video in ("a", "b"):
        for t, frame in enumerate(frames):
            ids = np.zeros((H, W), np.uint8)
            ids[2:8, 2 + t : 8 + t] = 1
            if video == "b" and t >= 5:
                ids[10:16, 10:16] = 2
            write_mask(root / video / f"{frame}.png", ids)
    return root


def test_meta_and_first_frames(tmp_path):
    valid = make_valid(tmp_path / "valid")
    meta = read_meta(valid)
    assert set(meta) == {"a", "b"} and meta["b"][2]["category"] == "ball"
    assert benchmark_frames(valid, "a") == SCORED
    assert first_frames(valid) == {"a": {1: "00000"}, "b": {1: "00000", 2: "00005"}}


def test_submission_keeps_the_scored_frames(tmp_path):
    valid = make_valid(tmp_path / "valid")
    preds = make_predictions(tmp_path / "preds")
    zip_path = prepare_submission(preds, valid, tmp_path / "out")
    expected = sorted(f"Annotations/{v}/{f}.png" for v in ("a", "b") for f in SCORED)
    with zipfile.ZipFile(zip_path) as archive:
        assert sorted(archive.namelist()) == expected
        with archive.open("Annotations/b/00010.png") as handle:
            image = Image.open(handle)
            image.load()
    assert image.mode == "P"  # palette PNG with object ids, as the server expects
    assert np.array_equal(np.array(image), read_mask(preds / "b" / "00010.png"))
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out" / "Annotations").rglob("*.png"))
    assert written == expected
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Annotations", "submission.zip"]  # no leftovers


def test_submission_all_frames(tmp_path):
    valid = make_valid(tmp_path / "valid")
    preds = make_predictions(tmp_path / "preds")
    zip_path = prepare_submission(preds, valid, tmp_path / "out", all_frames=True)
    with zipfile.ZipFile(zip_path) as archive:
        assert len(archive.namelist()) == 2 * len(ALL)


def test_missing_prediction_refused_without_touching_old_zip(tmp_path):
    valid = make_valid(tmp_path / "valid")
    preds = make_predictions(tmp_path / "preds")
    zip_path = prepare_submission(preds, valid, tmp_path / "out")
    before = zip_path.read_bytes()
    (preds / "b" / "00005.png").unlink()
    with pytest.raises(LmrcError, match=r"b/00005\.png is missing"):
        prepare_submission(preds, valid, tmp_path / "out")
    assert zip_path.read_bytes() == before


def test_size_mismatch_and_bad_meta_refused(tmp_path):
    valid = make_valid(tmp_path / "valid")
    preds = make_predictions(tmp_path / "preds")
    write_mask(preds / "a" / "00005.png", np.zeros((H, W + 2), np.uint8))
    with pytest.raises(LmrcError, match=r"a/00005\.png is 34x24 but the video's frames are 32x24"):
        prepare_submission(preds, valid, tmp_path / "out")
    assert not (tmp_path / "out" / "submission.zip").exists()
    (valid / "meta.json").write_text('{"videos": 3}')
    with pytest.raises(LmrcError, match="not a YouTube-VOS meta file"):
        read_meta(valid)


def test_cli_packs_a_submission(tmp_path, capsys):
    valid = make_valid(tmp_path / "valid")
    preds = make_predictions(tmp_path / "preds")
    args = ["eval", "--youtube-vos", "--results", str(preds), "--gt", str(valid), "--out", str(tmp_path / "out")]
    assert cli_main(args) == 0
    assert (tmp_path / "out" / "submission.zip").is_file()
    assert cli_main(args[:-2]) == 2
    assert "--youtube-vos needs --out" in capsys.readouterr().err


def test_run_segments_every_video_from_its_objects_first_frames_and_packs(tmp_path, capsys):
    import torch

    from lmrc.config import model_config
    from lmrc.model.network import LMRC
    from lmrc.model.weights import save_weights

    valid = make_valid(tmp_path / "valid")
    torch.manual_seed(0)
    weights = tmp_path / "lite.safetensors"
    save_weights(LMRC(model_config("lmrc-lite"), pretrained_backbone=False), weights)
    args = ["eval", "--youtube-vos", "--run", "--model", "lmrc-lite", "--weights", str(weights), "--size", "32",
            "--results", str(tmp_path / "pred"), "--gt", str(valid), "--out", str(tmp_path / "sub")]
    assert cli_main(args) == 0
    assert "frames/s" in capsys.readouterr().out
    with zipfile.ZipFile(tmp_path / "sub" / "submission.zip") as archive:
        assert sorted(archive.namelist()) == sorted(f"Annotations/{v}/{f}.png" for v in ("a", "b") for f in SCORED)
    b = [read_mask(tmp_path / "sub" / "Annotations" / "b" / f"{f}.png") for f in SCORED]
    assert b[0].max() <= 1  # object 2 does not exist before its first frame
    assert (b[1][10:16, 10:16] == 2).all()  # its given mask at 00005
