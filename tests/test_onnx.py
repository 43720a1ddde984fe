"""ONNX export and the onnxruntime path: each graph against PyTorch on random inputs (sizes, object counts and
memory lengths other than the ones it was traced at), and masks on the demo clip against the PyTorch segmenter."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'lmrc[onnx]')")

from lmrc.inference.onnx_export import export_copy, export_onnx  # noqa: E402
from lmrc.inference.onnx_runtime import OnnxModel, open_onnx_model  # noqa: E402
from lmrc.inference.segmenter import Segmenter  # noqa: E402
from lmrc.model.network import MemoryInput  # noqa: E402
from lmrc.model.weights import load_model  # noqa: E402
from lmrc.utils.errors import LmrcError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped():
    return load_model("lmrc-lite")


@pytest.fixture(scope="module")
def exported(shipped, tmp_path_factory):
    """The shipped lmrc-lite's graphs (global read top-k 20, the default), traced at 64 x 96 (they take other sizes)."""
    folder = tmp_path_factory.mktemp("onnx")
    manifest = export_onnx(shipped, folder, read_top_k=20, size=(64, 96))
    return folder, manifest


def test_export_writes_graphs_and_manifest(exported, shipped):
    folder, manifest = exported
    assert sorted(p.name for p in folder.iterdir()) == ["key_encoding.onnx", "manifest.json", "read_and_decode.onnx",
                                                         "value_encoding.onnx"]
    assert manifest["config"]["setting"] == shipped.config.setting
    assert manifest["config"]["value_trunk"] == shipped.config.value_trunk and manifest["read_top_k"] == 20
    assert manifest["graphs"]["read_and_decode"]["outputs"][:3] == ["logits", "agg_logits", "probs"]
    assert manifest["check"]["max_abs_difference"] < 1e-3


def test_each_graph_matches_pytorch_on_random_inputs(exported, shipped):
    """Another size (96 x 128), 3 objects and a 3-frame memory: key and value graphs against the (exported copy of
    the) network, read-and-decode against `LMRC.read_and_decode` itself (native local reads, chunked top-k read)."""
    onnx_model = OnnxModel(exported[0], threads=1)
    reference = export_copy(shipped)
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 96, 128, generator=generator)
    masks = torch.softmax(3 * torch.randn(1, 4, 96, 128, generator=generator), 1)[:, 1:]
    with torch.inference_mode():
        query, expected_query = onnx_model.encode_key(image), reference.encode_key(image)
        for r in (2, 3, 4):
            torch.testing.assert_close(query.keys[r], expected_query.keys[r], atol=1e-3, rtol=0)
            torch.testing.assert_close(query.features[r], expected_query.features[r], atol=1e-3, rtol=0)
        values, expected_values = onnx_model.encode_value(image, query, masks), reference.encode_value(image, query, masks)
        for r in (2, 3, 4):
            torch.testing.assert_close(values[r], expected_values[r], atol=1e-3, rtol=0)

        keys = torch.cat([query.keys[4].flatten(2) + 0.3 * torch.randn(1, 64, 48, generator=generator)
                          for _ in range(3)], 2)
        global_values = torch.randn(1, 3, reference.read_value_channels(4), keys.shape[2], generator=generator)
        local_keys = {r: k + 0.3 * torch.randn(k.shape, generator=generator) for r, k in query.keys.items()}
        # as the value encoder writes them: one channel group per read of the stage where values are projected
        local_values = {r: torch.randn(1, 3, expected_values[r].shape[2], *k.shape[-2:], generator=generator)
                        for r, k in query.keys.items()}
        memory = MemoryInput(keys, global_values.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),
                             local_keys, local_values, global_key_sq=keys.pow(2).sum(1))
        got, expected = onnx_model.read_and_decode(query, memory, 20), reference.read_and_decode(query, memory, 20)
    assert got.logits.shape == (1, 3, 96, 128)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-3, rtol=0)
    torch.testing.assert_close(got.probs, expected.probs, atol=1e-3, rtol=0)
    assert set(got.reliability) == set(expected.reliability) == {"L2", "L3", "L4", "S2", "S3"}
    for name, weight in got.reliability.items():
        torch.testing.assert_close(weight, expected.reliability[name], atol=1e-3, rtol=0)


def test_demo_clip_masks_agree_with_pytorch(exported, shipped):
    """The same Segmenter driving the network and the graphs: per-frame IoU >= 0.99 over 15 frames at 160 px."""
    from lmrc.data.masks import read_mask
    from lmrc.data.video import open_frames

    first = read_mask(REPO / "demo" / "first_mask.png")
    torch_seg = Segmenter(shipped, size=160, precision="fp32", device="cpu")
    onnx_seg = Segmenter(OnnxModel(exported[0], threads=1), size=160)  # precision auto: fp32, the graphs' own
    assert onnx_seg.precision == "fp32"
    for index, frame in enumerate(open_frames(REPO / "demo" / "clip.mp4")):
        if index == 15:
            break
        mask = first if index == 0 else None
        a = torch_seg.probs_to_ids(torch_seg.step(frame.rgb, mask))
        b = onnx_seg.probs_to_ids(onnx_seg.step(frame.rgb, mask))
        for object_id in torch_seg.object_ids:
            union = np.logical_or(a == object_id, b == object_id).sum()
            iou = np.logical_and(a == object_id, b == object_id).sum() / max(union, 1)
            assert iou >= 0.99, f"frame {index}, object {object_id}: IoU {iou:.4f}"
    assert len(onnx_seg.memory_frames) == len(torch_seg.memory_frames) == 3


def test_segment_command_runs_the_graphs(exported, tmp_path):
    from lmrc.cli import main

    out = tmp_path / "masks"
    assert main(["segment", str(REPO / "demo" / "clip.mp4"), "--mask", str(REPO / "demo" / "first_mask.png"),
                 "--runtime", "onnxruntime", "--onnx", str(exported[0]), "--size", "64", "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 60


def test_bench_runs_both_runtimes_side_by_side(exported, capsys):
    import json

    from lmrc.cli import main

    assert main(["bench", "--runtime", "onnxruntime", "--onnx", str(exported[0]), "--size", "64", "--frames", "3",
                 "--warmup", "1", "--threads", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["runs"]) == ["torch", "onnxruntime"] and report["runtime"] == "torch vs onnxruntime"
    assert report["runs"]["onnxruntime"]["stages_ms"]["read_and_decode"] > 0 and report["ratio"] > 0
    assert report["cpu"]["name"]


def test_bad_folders_and_options_give_one_clear_error(exported, tmp_path, capsys):
    with pytest.raises(LmrcError, match="no manifest.json"):
        OnnxModel(tmp_path)
    model = open_onnx_model(exported[0])
    assert model.read_top_k == 20
    # the global read's top-k is fixed in the graph: another one (or None, every position) is refused
    for top_k in (5, None):
        with pytest.raises(LmrcError, match=f"--top-k {top_k or 0}"):
            Segmenter(model, top_k=top_k)
    query = model.encode_key(torch.rand(1, 3, 64, 96))
    memory = MemoryInput(query.keys[4].flatten(2), torch.rand(1, 1, model.read_value_channels(4), 24), {}, {})
    with pytest.raises(LmrcError, match="--top-k 5"):
        model.read_and_decode(query, memory, 5)
    with pytest.raises(LmrcError, match="fp32"):
        Segmenter(model, precision="bf16")
    from lmrc.cli import main

    assert main(["export", "--out", str(exported[0])]) == 2  # graphs already there, no --overwrite
    segment = ["segment", str(REPO / "demo" / "clip.mp4"), "--mask", str(REPO / "demo" / "first_mask.png"),
               "--out", str(tmp_path / "out")]
    capsys.readouterr()
    for extra, message in ((["--onnx", str(exported[0])], "add --runtime onnxruntime"),
                           (["--runtime", "onnxruntime", "--precision", "bf16"], "fp32"),
                           (["--runtime", "onnxruntime", "--device", "cuda"], "CPU"),
                           (["--runtime", "onnxruntime", "--onnx", str(exported[0]), "--top-k", "5"], "--top-k 5")):
        assert main(segment + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_setting_a_exports_and_segments_like_pytorch(tmp_path):
    """A graph without local reads or comparator (setting A, value encoding at stage 4 only), random weights of
    today's lmrc-lite preset (mask-only value trunk, 1x1 fusion), a global read over every position (top-k None),
    with and without test-time flip."""
    from lmrc.config import model_config
    from lmrc.model.network import LMRC

    torch.manual_seed(0)
    model = LMRC(model_config("lmrc-lite", setting="A"), pretrained_backbone=False).eval()
    assert (model.config.value_trunk, model.config.value_fusion_kernel) == ("mask", 1)
    manifest = export_onnx(model, tmp_path, read_top_k=None, size=(64, 96))
    assert manifest["value_stages"] == [4] and "local_key2" not in manifest["graphs"]["read_and_decode"]["inputs"]
    onnx_model = OnnxModel(tmp_path, threads=1)
    assert onnx_model.read_top_k is None
    rng = np.random.default_rng(0)
    mask = np.zeros((64, 96), np.uint8)
    mask[10:30, 10:40], mask[40:60, 50:90] = 1, 2
    for flip, frames in ((False, 7), (True, 3)):
        options = dict(size=64, top_k=None, flip=flip, device="cpu")
        torch_seg, onnx_seg = Segmenter(model, precision="fp32", **options), Segmenter(onnx_model, **options)
        assert onnx_seg.model is onnx_model  # used as it is, not copied
        for index in range(frames):
            frame = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
            given = mask if index == 0 else None
            torch.testing.assert_close(onnx_seg.step(frame, given), torch_seg.step(frame, given), atol=1e-3, rtol=0)
