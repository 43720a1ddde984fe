"""DAVIS evaluation end to end on small synthetic roots (2016 and 2017 layouts), the CLI, and real DAVIS 2016."""
import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmrc.cli import main as cli_main
from lmrc.data.masks import read_mask, write_mask
from lmrc.errors import LmrcError
from lmrc.eval.davis import GLOBAL_COLUMNS, csv_paths, evaluate, split_sequences, write_csvs

H, W, T = 48, 64, 6


def seq_masks(n_objects: int, frames: int = T) -> list[np.ndarray]:
    """Frames of H x W ids: object k is a 10x10 square moving right by 2 px a frame."""
    out = []
    for t in range(frames):
        ids = np.zeros((H, W), np.uint8)
        for k in range(n_objects):
            top, left = 4 + 14 * k, 4 + 2 * t
            ids[top : top + 10, left : left + 10] = k + 1
        out.append(ids)
    return out


def make_2017(root: Path, sequences={"two": 2, "one": 1}) -> Path:
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("".join(f"{s}\n" for s in sequences))
    for seq, n in sequences.items():
        for t, ids in enumerate(seq_masks(n)):
            write_mask(root / "Annotations" / "480p" / seq / f"{t:05d}.png", ids)
    return root


def make_2016(root: Path, sequences=("cat", "dog")) -> Path:
    (root / "ImageSets" / "480p").mkdir(parents=True)
    lines = []
    for seq in sequences:
        for t, ids in enumerate(seq_masks(1)):
            path = root / "Annotations" / "480p" / seq / f"{t:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ids * 255).save(path)  # DAVIS 2016: mode L, 0 / 255
            lines.append(f"/JPEGImages/480p/{seq}/{t:05d}.jpg /Annotations/480p/{seq}/{t:05d}.png\n")
    (root / "ImageSets" / "480p" / "train.txt").write_text("".join(lines))
    return root


def copy_results(gt_root: Path, out: Path) -> Path:
    shutil.copytree(gt_root / "Annotations" / "480p", out)
    return out


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_perfect_results_2017_and_csvs(tmp_path):
    gt = make_2017(tmp_path / "davis")
    res = copy_results(gt, tmp_path / "res")
    evaluation = evaluate(res, gt, split="val", workers=1)
    assert evaluation.year == 2017
    assert [name for name, _, _ in evaluation.per_object()] == ["two_1", "two_2", "one_1"]
    assert evaluation.frames == 2 * (T - 2)  # first and last frames are not scored
    global_path, per_seq_path = write_csvs(evaluation, res)
    assert global_path.name == "global_results-val.csv" and per_seq_path.name == "per-sequence_results-val.csv"
    rows = read_csv(global_path)
    assert rows[0] == ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
    assert rows[1] == ["1.000", "1.000", "1.000", "0.000", "1.000", "1.000", "0.000"]
    assert read_csv(per_seq_path) == [
        ["Sequence", "J-Mean", "F-Mean"], ["two_1", "1.000", "1.000"], ["two_2", "1.000", "1.000"],
        ["one_1", "1.000", "1.000"],
    ]


def test_global_means_are_over_objects_not_sequences(tmp_path):
    gt = make_2017(tmp_path / "davis")
    res = copy_results(gt, tmp_path / "res")
    for path in (res / "two").glob("*.png"):  # drop object 2 of "two" everywhere
        ids = np.array(Image.open(path))
        write_mask(path, np.where(ids == 2, 0, ids))
    scores = evaluate(res, gt, split="val", workers=1).global_scores()
    # objects two_1 = 1, two_2 = 0, one_1 = 1: mean over objects 2/3 (over sequences it would be 3/4)
    assert scores["J-Mean"] == pytest.approx(2 / 3)
    assert scores["F-Mean"] == pytest.approx(2 / 3)
    assert scores["J-Recall"] == pytest.approx(2 / 3)
    assert scores["J&F-Mean"] == pytest.approx(2 / 3)
    assert scores["J-Decay"] == pytest.approx(0)


def test_first_and_last_frames_are_not_scored(tmp_path):
    gt = make_2017(tmp_path / "davis")
    res = copy_results(gt, tmp_path / "res")
    for seq in ("two", "one"):
        write_mask(res / seq / "00000.png", np.zeros((H, W), np.uint8))  # wrong, but not scored
        (res / seq / f"{T - 1:05d}.png").unlink()  # absent, and not needed
    assert evaluate(res, gt, split="val", workers=1).global_scores()["J&F-Mean"] == 1


def test_known_error_per_frame(tmp_path):
    gt = make_2017(tmp_path / "davis", {"one": 1})
    res = copy_results(gt, tmp_path / "res")
    path = res / "one" / "00002.png"  # shift the square of frame 2 by 5 px: J = 50/150 on that frame
    ids = np.array(Image.open(path))
    write_mask(path, np.roll(ids, 5, axis=1))
    evaluation = evaluate(res, gt, split="val", workers=1)
    assert np.allclose(evaluation.objects[0].j, [1, 1 / 3, 1, 1])


def test_void_in_ground_truth_is_background(tmp_path):
    gt = make_2017(tmp_path / "davis", {"one": 1})
    res = copy_results(gt, tmp_path / "res")
    for path in (gt / "Annotations" / "480p" / "one").glob("*.png"):
        ids = np.array(Image.open(path))
        ids[30:40, 40:60] = 255  # a void region the results leave as background
        write_mask(path, ids)
    assert evaluate(res, gt, split="val", workers=1).global_scores()["J&F-Mean"] == 1


def test_layout_2016_binary_masks(tmp_path):
    gt = make_2016(tmp_path / "davis")
    assert split_sequences(gt, "train", 2016) == ["cat", "dog"]
    res = copy_results(gt, tmp_path / "res")  # 0/255 results
    write_mask(res / "dog" / "00003.png", seq_masks(1)[3])  # palette id 1 is the same object
    evaluation = evaluate(res, gt, split="train", workers=1)
    assert evaluation.year == 2016
    assert [n for n, _, _ in evaluation.per_object()] == ["cat_1", "dog_1"]
    assert evaluation.global_scores()["J&F-Mean"] == 1


def test_sequence_subset(tmp_path):
    gt = make_2017(tmp_path / "davis")
    res = copy_results(gt, tmp_path / "res")
    shutil.rmtree(res / "two")
    evaluation = evaluate(res, gt, split="val", sequences=["one"], workers=1)
    assert [n for n, _, _ in evaluation.per_object()] == ["one_1"]
    with pytest.raises(LmrcError, match="'nope'|nope.*not in the 'val' split"):
        evaluate(res, gt, split="val", sequences=["nope"], workers=1)


def test_parallel_matches_serial(tmp_path):
    gt = make_2017(tmp_path / "davis")
    res = copy_results(gt, tmp_path / "res")
    write_mask(res / "one" / "00002.png", np.zeros((H, W), np.uint8))
    serial = evaluate(res, gt, split="val", workers=1)
    parallel = evaluate(res, gt, split="val", workers=2)
    assert serial.per_object() == parallel.per_object()


def test_missing_frame_refused_and_stale_csvs_removed(tmp_path):
    gt = make_2017(tmp_path / "davis")
    res = copy_results(gt, tmp_path / "res")
    write_csvs(evaluate(res, gt, split="val", workers=1), res)
    assert all(p.exists() for p in csv_paths(res, "val"))
    (res / "one" / "00003.png").unlink()
    with pytest.raises(LmrcError, match=r"one/00003\.png is missing.*write a mask for every frame"):
        evaluate(res, gt, split="val", workers=1)
    assert not any(p.exists() for p in csv_paths(res, "val"))  # no stale score survives a failed run


def test_missing_sequence_refused(tmp_path):
    gt = make_2017(tmp_path / "davis")
    res = copy_results(gt, tmp_path / "res")
    shutil.rmtree(res / "two")
    with pytest.raises(LmrcError, match=r"res/two not found.*--sequences"):
        evaluate(res, gt, split="val", workers=2)


def test_size_mismatch_refused(tmp_path):
    gt = make_2017(tmp_path / "davis")
    res = copy_results(gt, tmp_path / "res")
    write_mask(res / "two" / "00002.png", np.zeros((H, W + 1), np.uint8))
    with pytest.raises(LmrcError, match=rf"two/00002\.png is {W + 1}x{H} but the annotations are {W}x{H}"):
        evaluate(res, gt, split="val", workers=1)


def test_unknown_object_id_refused(tmp_path):
    gt = make_2017(tmp_path / "davis", {"one": 1})
    res = copy_results(gt, tmp_path / "res")
    write_mask(res / "one" / "00002.png", np.full((H, W), 3, np.uint8))
    with pytest.raises(LmrcError, match="object id 3"):
        evaluate(res, gt, split="val", workers=1)


def test_cli_prints_table_and_writes_csvs(tmp_path, capsys):
    gt = make_2017(tmp_path / "davis")
    res = copy_results(gt, tmp_path / "res")
    assert cli_main(["eval", "--results", str(res), "--gt", str(gt), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "two_2" in out and "J&F-Mean" in out and "global_results-val.csv" in out
    assert read_csv(res / "global_results-val.csv")[0] == list(GLOBAL_COLUMNS)


def test_cli_errors_are_one_line(tmp_path, capsys):
    gt = make_2017(tmp_path / "davis")
    res = copy_results(gt, tmp_path / "res")
    (res / "one" / "00001.png").unlink()
    assert cli_main(["eval", "--results", str(res), "--gt", str(gt), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmrc eval: error: result") and "Traceback" not in err
    assert cli_main(["eval", "--results", str(res), "--gt", str(gt), "--split", "test"]) == 2
    assert "no split file for 'test'" in capsys.readouterr().err


def test_cli_run_segments_then_scores(tmp_path, capsys):
    import torch

    from lmrc.config import model_config
    from lmrc.model.network import LMRC
    from lmrc.model.weights import save_weights

    gt = make_2017(tmp_path / "davis")
    rng = np.random.default_rng(0)
    for seq in ("one", "two"):
        for mask in sorted((gt / "Annotations" / "480p" / seq).glob("*.png")):
            frame = gt / "JPEGImages" / "480p" / seq / f"{mask.stem}.jpg"
            frame.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (*read_mask(mask).shape, 3), dtype=np.uint8)).save(frame)
    torch.manual_seed(0)
    weights = tmp_path / "lite.safetensors"
    save_weights(LMRC(model_config("lmrc-lite"), pretrained_backbone=False), weights)
    results = tmp_path / "r"
    args = ["eval", "--run", "--model", "lmrc-lite", "--weights", str(weights), "--results", str(results),
            "--gt", str(gt), "--size", "32", "--workers", "1"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "frames/s" in out and "peak memory" in out
    for seq in ("one", "two"):
        frames = sorted(p.name for p in (gt / "Annotations" / "480p" / seq).glob("*.png"))
        assert sorted(p.name for p in (results / seq).glob("*.png")) == frames
        assert read_mask(results / seq / frames[0]).max() >= 1  # the first frame is the given mask
    header, row = read_csv(results / "global_results-val.csv")
    assert header[0] == "J&F-Mean" and 0 <= float(row[0]) <= 1
    # --top-k reaches the model (a negative k is refused by load_model) and means nothing without --run
    assert cli_main(args + ["--top-k", "-1"]) == 2
    assert "top-k" in capsys.readouterr().err
    assert cli_main(["eval", "--results", str(results), "--gt", str(gt), "--top-k", "20"]) == 2
    assert "only apply with --run" in capsys.readouterr().err


def test_real_ground_truth_against_itself(davis2016, tmp_path):
    res = tmp_path / "res"
    res.mkdir()
    for seq in ("rollerblade", "soccerball"):  # the two shortest sequences (35 and 48 frames)
        (res / seq).symlink_to(davis2016 / "Annotations" / "480p" / seq)
    evaluation = evaluate(res, davis2016, split="train", sequences=["rollerblade", "soccerball"])
    assert evaluation.frames == 33 + 46
    scores = evaluation.global_scores()
    assert scores["J-Mean"] == 1 and scores["F-Mean"] == 1 and scores["J-Decay"] == 0
