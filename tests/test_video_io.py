"""Frame sources (`lmrc.data.video`): videos written here with PyAV, frame folders, DAVIS-style roots, bad frames."""
from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

av = pytest.importorskip("av")

from lmrc.data.video import Frame, LmrcWarning, VideoSource, natural_key, open_frames  # noqa: E402
from lmrc.errors import LmrcError  # noqa: E402

H, W = 48, 64
# The shared data sits beside the project (`../shared/data`); tests that need it skip where it is absent.
CUTIE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cutie_examples"


def frame_rgb(i: int, h: int = H, w: int = W) -> np.ndarray:
    """A frame whose red level encodes its index (survives lossy coding to within a few levels)."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = 10 * i
    rgb[..., 1] = 60
    return rgb


def write_video(path: Path, n: int, codec: str, fps: int = 12, pix_fmt: str = "yuv420p") -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = W, H, pix_fmt
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_rgb(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_frames(folder: Path, names: list[str], ext: str = ".png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(frame_rgb(i)).save(folder / f"{name}{ext}", quality=95)
    return folder


def red_index(frame: Frame) -> int:
    return int(round(float(frame.rgb[..., 0].mean()) / 10))


@pytest.fixture(scope="module")
def mp4(tmp_path_factory) -> Path:
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", 20, codec)


@pytest.fixture(scope="module")
def mkv(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "clip.mkv", 20, "ffv1")


@pytest.mark.parametrize("kind", ["mp4", "mkv"])
def test_video_names_sizes_fps_and_content(kind, request):
    path = request.getfixturevalue(kind)
    source = open_frames(path)
    assert isinstance(source, VideoSource)
    assert source.size == (H, W)
    assert source.fps == pytest.approx(12.0)
    frames = list(source)
    assert [f.index for f in frames] == list(range(20))
    assert [f.name for f in frames] == [f"{i:05d}" for i in range(20)]
    assert all(f.rgb.shape == (H, W, 3) and f.rgb.dtype == np.uint8 for f in frames)
    assert [red_index(f) for f in frames] == list(range(20))
    assert source.skipped == []


def test_video_length_known_for_mp4_unknown_for_mkv(mp4, mkv):
    assert len(open_frames(mp4)) == 20
    source = open_frames(mkv)  # Matroska stores no frame count
    assert source.num_frames is None and source.names is None
    with pytest.raises(TypeError):
        len(source)
    assert bool(source)
    assert source.index_of("00007") == 7 and source.index_of("bear") is None


def test_video_is_decoded_lazily(mp4, monkeypatch):
    # Count the frames PyAV hands out: taking 3 must not decode the other 17.
    decoded = []
    original = av.VideoFrame.to_ndarray

    def counting(self, *args, **kwargs):
        decoded.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "to_ndarray", counting)
    source = open_frames(mp4)
    first = list(itertools.islice(source, 3))
    assert [f.index for f in first] == [0, 1, 2]
    assert len(decoded) == 3


def test_video_is_reiterable(mkv):
    source = open_frames(mkv)
    assert len(list(source)) == 20
    assert [f.index for f in itertools.islice(source, 2)] == [0, 1]


def test_truncated_mp4_is_a_clear_error(mp4, tmp_path):
    data = mp4.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])  # drops the moov index PyAV's muxer writes at the end
    with pytest.raises(LmrcError, match="truncated"):
        list(open_frames(cut))


def test_truncated_mkv_reports_missing_frames(mkv, tmp_path):
    data = mkv.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: int(len(data) * 0.55)])
    source = open_frames(cut)
    with pytest.raises(LmrcError, match=r"ended after \d+ frames .*truncated"):
        list(source)
    lenient = open_frames(cut, skip_bad_frames=True)
    with pytest.warns(LmrcWarning, match="truncated"):
        frames = list(lenient)
    assert 0 < len(frames) < 20
    assert [f.index for f in frames] == list(range(len(frames)))


def test_folder_png_and_jpg_natural_order(tmp_path):
    names = ["f1", "f2", "f10", "f11"]
    folder = write_frames(tmp_path / "seq", names, ".jpg")
    (folder / "notes.txt").write_text("not a frame")
    (folder / ".hidden.png").write_bytes(b"")
    source = open_frames(folder)
    assert source.names == names and len(source) == 4 and source.fps is None
    frames = list(source)
    assert [f.name for f in frames] == names
    assert [red_index(f) for f in frames] == [0, 1, 2, 3]
    assert source.size == (H, W)

    pngs = write_frames(tmp_path / "png", ["00000", "00001"], ".png")
    assert [f.name for f in open_frames(pngs)] == ["00000", "00001"]
    assert natural_key("a2") < natural_key("a10")


def test_folder_reads_lazily_and_reports_corrupt_jpeg(tmp_path):
    folder = write_frames(tmp_path / "seq", [f"{i:05d}" for i in range(6)], ".jpg")
    bad = folder / "00003.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG in the middle
    source = open_frames(folder)
    # Frames before the bad one come out without touching it: reading is lazy.
    assert [f.index for f in itertools.islice(source, 3)] == [0, 1, 2]
    with pytest.raises(LmrcError, match=r"frame 3 .*00003\.jpg.*--skip-bad-frames"):
        list(source)

    lenient = open_frames(folder, skip_bad_frames=True)
    with pytest.warns(LmrcWarning, match="skipping frame 3"):
        frames = list(lenient)
    assert [f.index for f in frames] == [0, 1, 2, 4, 5]
    assert [f.name for f in frames] == ["00000", "00001", "00002", "00004", "00005"]
    assert lenient.skipped == [3]


def test_folder_frame_of_another_size_is_a_bad_frame(tmp_path):
    folder = write_frames(tmp_path / "seq", ["0", "1", "2"])
    Image.fromarray(frame_rgb(1, H + 10, W)).save(folder / "1.png")
    with pytest.raises(LmrcError, match="frame 1 .*64x58 while the frames before it are 64x48"):
        list(open_frames(folder))


def test_duplicate_stems_rejected(tmp_path):
    folder = write_frames(tmp_path / "seq", ["0", "1"], ".png")
    write_frames(folder, ["0"], ".jpg")
    with pytest.raises(LmrcError, match="several files named 0"):
        open_frames(folder)


def test_davis_and_youtube_vos_roots(tmp_path):
    davis = tmp_path / "davis"
    write_frames(davis / "JPEGImages" / "480p" / "bear", ["00000", "00001"], ".jpg")
    source = open_frames(davis)  # one sequence: picked
    assert source.path == davis / "JPEGImages" / "480p" / "bear" and source.sequence == "bear"
    assert open_frames(davis / "JPEGImages" / "480p" / "bear").names == ["00000", "00001"]

    write_frames(davis / "JPEGImages" / "480p" / "camel", ["00000"], ".jpg")
    with pytest.raises(LmrcError, match="2 sequences: bear, camel; pass one of them"):
        open_frames(davis)
    assert open_frames(davis, sequence="camel").sequence == "camel"
    with pytest.raises(LmrcError, match="sequence 'cow' not found.*bear, camel"):
        open_frames(davis, sequence="cow")

    ytvos = tmp_path / "valid"
    write_frames(ytvos / "JPEGImages" / "0a49f5265b", ["00000", "00005"], ".jpg")
    assert open_frames(ytvos).sequence == "0a49f5265b"


def test_input_errors_say_what_to_do(tmp_path):
    with pytest.raises(LmrcError, match="not found"):
        open_frames(tmp_path / "missing.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmrcError, match="holds no jpg/png frames"):
        open_frames(tmp_path / "empty")
    (tmp_path / "clip.gif").write_bytes(b"GIF89a")
    with pytest.raises(LmrcError, match="extension '.gif'.*pass a video"):
        open_frames(tmp_path / "clip.gif")
    single = write_frames(tmp_path / "one", ["00000"]) / "00000.png"
    with pytest.raises(LmrcError, match="single image; pass the folder"):
        open_frames(single)
    (tmp_path / "junk.mp4").write_bytes(b"\0" * 1000)
    with pytest.raises(LmrcError, match="cannot open video"):
        open_frames(tmp_path / "junk.mp4")


def test_real_cutie_root_lists_sequences():
    if not CUTIE.is_dir():
        pytest.skip(f"cutie_examples not found at {CUTIE}")
    with pytest.raises(LmrcError, match="bike, judo"):
        open_frames(CUTIE)
    judo = open_frames(CUTIE, sequence="judo")
    assert len(judo) == 16 and judo.size == (480, 854)
