"""`lmrc segment`: outputs for frame folders and videos, agreement with the streaming API, resume, every error.

The model is an untrained lmrc-lite saved to a temporary weights file; frames are tiny and --size is 32.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lmrc.cli import main as cli
from lmrc.config import model_config
from lmrc.data.masks import davis_palette, read_mask
from lmrc.model.network import LMRC
from lmrc.model.weights import load_model, save_weights

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
H, W, COUNT = 40, 56, 6



@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "lite.safetensors"
    save_weights(LMRC(model_config("lmrc-lite"), pretrained_backbone=False), path)
    return path


def video_frames(count: int = COUNT) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    background = rng.integers(0, 100, (H, W, 3), dtype=np.uint8)
    out = []
    for t in range(count):
        f = background.copy()
        f[10:22, 4 + 2 * t: 16 + 2 * t] = (220, 60, 50)
        f[26:36, 30:44] = (40, 200, 90)
        out.append(f)
    return out


def palette_png(path: Path, ids: np.ndarray, colours: int = 256) -> Path:
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(davis_palette()[:colours].reshape(-1).tolist())
    image.save(path)
    return path


def first_mask() -> np.ndarray:
    ids = np.zeros((H, W), np.uint8)
    ids[10:22, 4:16] = 1
    ids[26:36, 30:44] = 2
    return ids


@pytest.fixture
def folder(tmp_path) -> tuple[Path, Path]:
    frames = tmp_path / "clip"
    frames.mkdir()
    for t, f in enumerate(video_frames()):
        Image.fromarray(f).save(frames / f"frame{t:03d}.png")  # PNG: lossless, so both runs see the same pixels
    mask = palette_png(tmp_path / "frame000.png", first_mask())
    return frames, mask


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli(["segment", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_frame_folder(folder, weights, tmp_path, capsys):
    frames, mask = folder
    out = tmp_path / "out"
    code, stdout, _ = run([frames, "--mask", mask, "--weights", weights, "--size", 32, "--out", out], capsys)
    assert code == 0 and "segmented 6 frames (2 objects)" in stdout
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"frame{t:03d}.png" for t in range(COUNT)]  # named like the input frames
    for name in names:
        with Image.open(out / name) as image:
            assert image.mode == "P" and image.size == (W, H)  # palette, at the input's own size
        assert set(np.unique(read_mask(out / name)).tolist()) <= {0, 1, 2}
    np.testing.assert_array_equal(read_mask(out / "frame000.png"), first_mask())


def test_cli_matches_the_streaming_api(folder, weights, tmp_path, capsys):
    from lmrc.data.video import open_frames
    from lmrc.inference.segmenter import Segmenter, output_prob_to_mask

    frames, mask = folder
    out = tmp_path / "out"
    options = ["--size", 32, "--mem-every", 2, "--max-memory-frames", 2]
    assert run([frames, "--mask", mask, "--weights", weights, "--out", out, *options], capsys)[0] == 0
    seg = Segmenter(load_model("lmrc-lite", weights), size=32, mem_every=2, max_memory_frames=2)
    for frame in open_frames(frames):
        probs = seg.step(frame.rgb, first_mask() if frame.index == 0 else None)
        np.testing.assert_array_equal(read_mask(out / f"{frame.name}.png"), output_prob_to_mask(probs, seg.object_ids))


def test_mp4_with_overlay_and_soft_maps(weights, tmp_path, capsys):
    import av

    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for f in video_frames(8):
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    mask = palette_png(tmp_path / "00000.png", first_mask())
    overlay = tmp_path / "overlay.mp4"
    code, stdout, _ = run([clip, "--mask", mask, "--weights", weights, "--size", 32, "--overlay", overlay,
                           "--save-probs", "--precision", "bf16", "--device", "cpu", "--top-k", 3], capsys)  # default --out
    assert code == 0, stdout
    out = Path.cwd() / "clip_lmrc"
    try:
        assert sorted(p.stem for p in out.glob("*.png")) == [f"{t:05d}" for t in range(8)]
        soft = np.load(out / "probs" / "00003.npz")
        assert soft["probs"].shape == (2, H, W) and soft["object_ids"].tolist() == [1, 2]
        with av.open(str(overlay)) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(decoded) == 8 and decoded[0].shape == (H, W, 3)
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_default_out_is_beside_the_current_folder(folder, weights, cwd, capsys):
    frames, mask = folder
    assert run([frames, "--mask", mask, "--weights", weights, "--size", 32], capsys)[0] == 0
    assert len(list((cwd / "clip_lmrc").glob("*.png"))) == COUNT


def test_existing_results_resume_and_overwrite(folder, weights, tmp_path, capsys):
    frames, mask = folder
    out = tmp_path / "out"
    base = [frames, "--mask", mask, "--weights", weights, "--size", 32, "--out", out]
    assert run(base, capsys)[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    code, _, err = run(base, capsys)
    assert code == 2 and "already holds 6 result masks" in err and "--overwrite" in err
    (out / "frame004.png").unlink()
    code, stdout, _ = run([*base, "--resume"], capsys)
    assert code == 0 and "5 kept from the previous run" in stdout
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert set(after) == set(before)
    assert all(after[n] == before[n] for n in before if n != "frame004.png")  # finished frames untouched
    assert run([*base, "--overwrite"], capsys)[0] == 0
    with pytest.raises(SystemExit):
        cli(["segment", *map(str, base), "--overwrite", "--resume"])


def test_no_weights_is_a_clear_error_and_writes_nothing(folder, tmp_path, capsys, monkeypatch):
    import lmrc.model.weights as weights_module

    monkeypatch.delenv("LMRC_WEIGHTS_DIR", raising=False)
    monkeypatch.setattr(weights_module, "_REPO_WEIGHTS", tmp_path / "no-weights-here")
    frames, mask = folder
    out = tmp_path / "out"
    code, _, err = run([frames, "--mask", mask, "--out", out, "--overlay", tmp_path / "o.mp4"], capsys)
    assert code == 2 and "no weights for lmrc-lite" in err and "--weights" in err
    assert "Traceback" not in err
    assert not out.exists() and not (tmp_path / "o.mp4").exists()


def _errors(tmp_path: Path, frames: Path, mask: Path, weights: Path) -> list[tuple[list, str]]:
    empty = palette_png(tmp_path / "empty.png", np.zeros((H, W), np.uint8))
    small = palette_png(tmp_path / "small.png", first_mask()[:20, :20])
    bad_dir = tmp_path / "has_results"
    bad_dir.mkdir()
    palette_png(bad_dir / "frame000.png", first_mask())
    return [
        ([tmp_path / "nope", "--mask", mask], "input"),
        ([frames, "--mask", tmp_path / "nope.png"], "not found"),
        ([frames, "--mask", empty], "is empty"),
        ([frames, "--mask", small], "20x20 but the frames are 56x40"),
        ([frames, "--box", "500,10,600,30"], "--box 1 on frame 0: box (500, 10, 600, 30) lies outside the 56x40"),
        ([frames, "--box", "5,10,5,30"], "is empty"),
        ([frames, "--box", "1,2,3"], "four numbers X0,Y0,X1,Y1"),
        ([frames, "--box", "4,10,16,22", "--prompt-frame", 99], "no readable frame 99"),
        ([frames, "--mask", mask, "--prompt-frame", 2], "--prompt-frame goes with --box"),
        ([frames, "--mask", mask, "--model", "lmrc-r50"], "is for lmrc-lite, not lmrc-r50"),
        ([frames, "--mask", mask, "--weights", tmp_path / "missing.safetensors"], "not found"),
        ([frames, "--mask", mask, "--mem-every", 0], "--mem-every"),
        ([frames, "--mask", mask, "--max-memory-frames", 1], "--max-memory-frames"),
        ([frames, "--mask", mask, "--size", 8], "--size"),
        ([frames, "--mask", mask, "--overlay", tmp_path / "o.gif"], ".mp4"),
    ]


def test_every_error_is_one_line_and_writes_nothing(folder, weights, tmp_path, capsys):
    frames, mask = folder
    out = tmp_path / "out"
    for argv, expected in _errors(tmp_path, frames, mask, weights):
        argv = [*argv, "--out", out] + ([] if "--weights" in argv else ["--weights", weights])
        code, _, err = run(argv, capsys)
        assert code == 2, (argv, err)
        assert expected in err and err.startswith("lmrc segment: error:"), (argv, err)
        assert "Traceback" not in err
        assert not out.exists(), argv


def test_output_folder_with_results_is_refused_before_running(folder, weights, tmp_path, capsys):
    frames, mask = folder
    out = tmp_path / "out"
    out.mkdir()
    palette_png(out / "frame000.png", np.zeros((H, W), np.uint8))
    code, _, err = run([frames, "--mask", mask, "--weights", weights, "--out", out], capsys)
    assert code == 2 and "already holds 1 result masks" in err
    assert sorted(p.name for p in out.iterdir()) == ["frame000.png"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(folder, weights, tmp_path, capsys):
    frames, mask = folder
    code, _, err = run([frames, "--mask", mask, "--weights", weights, "--device", "cuda", "--out", tmp_path / "o"],
                       capsys)
    assert code == 2 and "--device cuda" in err and "--device cpu" in err
    assert not (tmp_path / "o").exists()


BIKE = DATA / "cutie_examples"


@pytest.mark.skipif(not (BIKE / "JPEGImages" / "480p" / "bike").is_dir(), reason=f"cutie examples not found at {BIKE}")
def test_real_sequence_two_objects(weights, tmp_path, capsys):
    out = tmp_path / "bike"
    code, stdout, _ = run([BIKE / "JPEGImages" / "480p" / "bike", "--mask", BIKE / "Annotations" / "480p" / "bike",
                           "--weights", weights, "--size", 48, "--out", out], capsys)
    assert code == 0 and "(2 objects)" in stdout
    assert sorted(p.name for p in out.glob("*.png")) == [f"{t:05d}.png" for t in range(4)]
    ids = read_mask(out / "00002.png")
    assert ids.shape == (480, 854) and set(np.unique(ids).tolist()) <= {0, 1, 2}


@pytest.mark.skipif(not (DATA / "davis2016" / "JPEGImages").is_dir(), reason=f"DAVIS 2016 not found at {DATA}")
def test_segment_sequence_stats_on_davis(weights, tmp_path):
    from lmrc.inference.run import segment_sequence

    root = DATA / "davis2016"
    sequence = sorted(p.name for p in (root / "JPEGImages" / "480p").iterdir() if p.is_dir())[0]
    frames = root / "JPEGImages" / "480p" / sequence
    first = sorted((root / "Annotations" / "480p" / sequence).glob("*.png"))[0]
    from lmrc.data.video import open_frames

    source = open_frames(frames)
    source.files = source.files[:3]  # three frames are enough for the mechanics
    stats = segment_sequence(load_model("lmrc-lite", weights), source, first, tmp_path / sequence, size=32)
    assert stats.frames == 3 and stats.written == 3 and stats.fps > 0 and stats.peak_memory_mb > 0
    assert len(list((tmp_path / sequence).glob("*.png"))) == 3
