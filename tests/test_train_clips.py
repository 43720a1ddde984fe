"""Training that looks like inference: the clip forward pass (lmrc.train.clip_pass), look-alike distractors,
new config options, data from every kind, and starting from weights of another setting (init.transfer_from)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmrc.config import model_config
from lmrc.errors import LmrcError
from lmrc.model.network import LMRC
from lmrc.train.clip_pass import clip_forward
from lmrc.train.config import config_from_dict, load_config

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import make_tiny_davis2016, tiny_config, write_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _model(setting: str = "F", seed: int = 0) -> LMRC:
    torch.manual_seed(seed)
    model = LMRC(model_config("lmrc-lite", setting=setting), pretrained_backbone=False)
    model.train()
    for m in model.modules():  # frozen BN statistics, as the trainer
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def _clip(t: int, b: int = 2, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, t, 3, size, size, generator=g)
    masks = torch.zeros(b, t, 2, size, size)
    for i in range(t):
        masks[:, i, 0, 4:16, 4 + i:16 + i] = 1
        masks[:, i, 1, 20:28, 18:30] = 1
    return images, masks, torch.ones(b, 2, dtype=torch.bool)


@pytest.mark.parametrize("setting", ["F", "A"])
def test_three_frame_clip_pass_is_exactly_the_networks_training_forward(setting):
    model = _model(setting)
    images, masks, valid = _clip(3)
    reference = model(images, masks[:, 0], valid)
    clip = clip_forward(model, images, masks[:, 0], valid)
    assert len(clip.outputs) == 2
    for ours, theirs in zip(clip.outputs, (reference.local_frame, reference.query_frame)):
        assert torch.equal(ours.agg_logits, theirs.agg_logits)
        assert ours.reliability.keys() == theirs.reliability.keys()
    assert all(torch.equal(clip.query_keys[r], reference.query_keys[r]) for r in (2, 3, 4))


def test_clip_pass_is_causal_and_global_memory_grows_every_mem_every_frames():
    model = _model("F")
    images, masks, valid = _clip(5)
    seen = []
    read = model.read_and_decode

    def recording(query, memory):
        seen.append((memory.global_keys.shape[-1], memory.local_keys[2].clone(), query.keys[2].clone()))
        return read(query, memory)

    model.read_and_decode = recording
    with torch.no_grad():
        plain = clip_forward(model, images, masks[:, 0], valid)
        grown = clip_forward(model, images, masks[:, 0], valid, mem_every=2)
    model.read_and_decode = read
    positions = (32 // 16) ** 2
    # global memory: frame 0 alone; with mem_every=2 frame 2 joins it from frame 3 on
    assert [m for m, _, _ in seen] == [positions] * 4 + [positions, positions, 2 * positions, 2 * positions]
    for t in range(1, 5):  # the local memory of frame t is frame t-1 (frame 0 for frame 1)
        _, local, _ = seen[t - 1]
        torch.testing.assert_close(local, seen[t - 2][2] if t > 1 else model.encode_key(images[:, 0]).keys[2])
    with torch.no_grad():
        changed = images.clone()
        changed[:, 4] = torch.rand_like(changed[:, 4])
        later = clip_forward(model, changed, masks[:, 0], valid, mem_every=2)
    assert len(plain.outputs) == 4
    # frames 1 and 2 read frame 0 alone either way; frame 3 reads frames 0 and 2 with mem_every=2
    for i in (0, 1):
        torch.testing.assert_close(grown.outputs[i].agg_logits, plain.outputs[i].agg_logits, rtol=0, atol=1e-5)
    assert not torch.equal(grown.outputs[2].agg_logits, plain.outputs[2].agg_logits)
    # a frame's prediction never depends on later frames
    for i in range(3):
        torch.testing.assert_close(later.outputs[i].agg_logits, grown.outputs[i].agg_logits, rtol=0, atol=1e-5)


def test_clip_pass_gradient_flows_through_the_models_own_predictions():
    model = _model("F")
    images, masks, valid = _clip(4)
    out = clip_forward(model, images, masks[:, 0], valid)
    first_prediction = out.outputs[0].probs
    first_prediction.retain_grad()
    out.outputs[-1].agg_logits.logsumexp(1).mean().backward()
    # frame 3 reads frame 2's value, encoded from frame 2's prediction, which read frame 1's: the loss of the last
    # frame reaches frame 1's soft prediction
    assert first_prediction.grad is not None and first_prediction.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- distractors

def test_pasted_distractor_is_the_objects_own_pixels_labelled_background():
    from lmrc.data.synthetic import paste_distractor

    t, h, w = 4, 64, 96
    images = torch.randint(0, 255, (t, 3, h, w), dtype=torch.uint8)
    ids = torch.zeros(t, h, w, dtype=torch.uint8)
    for i in range(t):
        ids[i, 10:26, 8 + 2 * i:30 + 2 * i] = 1
    pasted_any = False
    for seed in range(6):
        rng = np.random.default_rng(seed)
        out, out_ids, placed = paste_distractor(images, ids, 1, rng, start=1, scale=(1.0, 1.0), recolour=0.0)
        if not placed.any():
            continue
        pasted_any = True
        assert not placed[0].any() and torch.equal(out[0], images[0])  # frames before `start` untouched
        assert not (placed & (ids == 1)).any()  # never over the target
        assert torch.equal(out_ids == 1, ids == 1)  # the target keeps its label...
        assert not out_ids[placed].any()  # ...the copy is background
        for i in range(1, t):
            ys, xs = torch.nonzero(placed[i], as_tuple=True)
            sy, sx = torch.nonzero(ids[i] == 1, as_tuple=True)
            dy, dx = int(ys.min() - sy.min()), int(xs.min() - sx.min())
            assert torch.equal(placed[i].roll((-dy, -dx), (0, 1)), ids[i] == 1)  # the object's shape, moved
            source = images[i].roll((dy, dx), (1, 2))
            assert torch.equal(out[i][:, placed[i]], source[:, placed[i]])  # the object's own pixels
    assert pasted_any


def test_distractor_changes_the_images_not_the_labels_of_a_training_sample(tmp_path):
    from lmrc.data.datasets import VOSTrainingDataset, read_davis2016

    root = make_tiny_davis2016(tmp_path / "d", sequences=1, frames=8, size=(96, 128))
    seqs = read_davis2016(root)
    plain = VOSTrainingDataset(seqs, max_gap=7, num_frames=5, crop_size=(64, 64), max_objects=1)
    with_copy = VOSTrainingDataset(seqs, max_gap=7, num_frames=5, crop_size=(64, 64), max_objects=1,
                                   distractor_prob=1.0)
    differ = 0
    for i in range(4):
        a, b = plain[i], with_copy[i]
        assert a["images"].shape == (5, 3, 64, 64)
        # the distractor has its own random stream: every other choice (frames, crop, flip) is the same
        assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["info"]["frames"], b["info"]["frames"])
        differ += not torch.equal(a["images"], b["images"])
    assert differ >= 2


# ------------------------------------------------------------------------------------------- configs

def test_new_config_options_are_checked(tmp_path):
    root = make_tiny_davis2016(tmp_path / "d", sequences=1)
    cfg = config_from_dict(tiny_config(root, data={"num_frames": 4, "max_gap": 3, "distractor_prob": 0.5},
                                       clip={"mem_every": 2}))
    assert cfg.data.num_frames == 4 and cfg.clip.mem_every == 2 and cfg.optim.precision == "fp32"
    assert config_from_dict(tiny_config(root)).clip.mem_every is None  # the paper's sample by default
    bad = [({"data": {"num_frames": 2}}, "num_frames must be >= 3"),
           ({"data": {"num_frames": 6, "max_gap": 4}}, "max_gap"),
           ({"data": {"distractor_prob": 1.5}}, "distractor_prob"),
           ({"clip": {"mem_every": 0}}, "mem_every"),
           ({"clip": {"memevery": 2}}, "memevery"),
           ({"data": {"datasets": [{"kind": "vidoe_masks", "root": str(root)}]}}, "vidoe_masks")]
    for override, message in bad:
        with pytest.raises(LmrcError, match=message):
            config_from_dict(tiny_config(root, **override))


def test_holdout_file_is_read_relative_to_the_config(tmp_path):
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "held.yaml").write_text("- alpha\n- beta\n")
    cfg = tiny_config(tmp_path / "data")
    cfg["data"]["holdout"] = "splits/held.yaml"
    config = load_config(write_config(tmp_path / "c.yaml", cfg))
    assert config.data.holdout == ["alpha", "beta"]
    cfg["data"]["holdout"] = "splits/missing.yaml"
    with pytest.raises(LmrcError, match="missing.yaml not found"):
        load_config(write_config(tmp_path / "c.yaml", cfg))


def test_v2_configs_hold_out_the_split_file_and_share_data_and_budget():
    held = [line[2:] for line in (REPO / "configs/splits/davis2016-holdout.yaml").read_text().splitlines()
            if line.startswith("- ")]
    assert len(held) == 6
    f, a, f1 = (load_config(REPO / "configs" / n) for n in
                ("lmrc-lite-v2.yaml", "lmrc-lite-v2-A.yaml", "lmrc-lite-v2-seed1.yaml"))
    assert f.data.holdout == held and f.model.setting == "F" and a.model.setting == "A"
    assert f.data == a.data and f.optim == a.optim and f.loss == a.loss and f.clip == a.clip
    assert f1.seed != f.seed and f1.data.seed != f.data.seed and f1.optim == f.optim
    kinds = {s.kind for s in f.data.datasets}
    assert kinds == {"davis2016", "video_masks", "image_masks"}


# ------------------------------------------------------------------------------------------- init

def test_transfer_sums_a_3x3_fusion_into_the_1x1_one(tmp_path):
    from lmrc.model.weights import save_weights
    from lmrc.train.transfer import transfer_weights

    torch.manual_seed(4)
    old = LMRC(model_config("lmrc-lite", value_trunk="image_and_mask", value_fusion_kernel=3), pretrained_backbone=False)
    path = tmp_path / "old-lite.safetensors"
    save_weights(old, path)
    new = _model("F", seed=5)
    report = transfer_weights(new, path)
    assert "value_encoder.fuse_frame.r2.weight" in report.pointwise
    assert report.mask_inputs == ["value_encoder.trunk.stem.0.0.weight"] and not report.fresh
    # on a mid-grey image (0 once normalised) the first trunk computes what the mask-only trunk now does
    masks, others = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        before = old.value_encoder.trunk(torch.full((2, 3, 32, 32), 0.5), masks, others)
        after = new.value_encoder.trunk(None, masks, others)
    for r in (2, 3, 4):
        torch.testing.assert_close(after[r], before[r])
    # on a constant feature map, away from the zero padding, the 3x3 conv and its 1x1 sum of taps agree
    features = torch.full((1, 24, 9, 9), 0.7)
    with torch.no_grad():
        three = old.value_encoder.fuse_frame["r2"](features)[..., 1:-1, 1:-1]
        one = new.value_encoder.fuse_frame["r2"](features)[..., 1:-1, 1:-1]
    torch.testing.assert_close(one, three)


def test_transfer_copies_what_matches_and_reports_the_rest(tmp_path):
    from lmrc.model.weights import save_weights
    from lmrc.train.transfer import transfer_weights

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lmrc.model.weights import tensors_digest

    path = tmp_path / "F.safetensors"
    save_weights(_model("F", seed=1), path)
    # A value encoder of another layout (e.g. a 1x1 fusion instead of 3x3): a tensor of another shape in the file.
    state = load_file(str(path))
    name = next(n for n in state if n.startswith("value_encoder.") and n.endswith("weight") and state[n].dim() == 4
                and state[n].shape[-1] == 3)
    state[name] = torch.zeros(*state[name].shape[:-2], 1, 1)

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta["sha256"] = tensors_digest(state)
    save_file(state, str(path), metadata=meta)

    for setting in ("F", "A"):
        model = _model(setting, seed=2)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        report = transfer_weights(model, path)
        target = model.state_dict()
        assert any(name in f for f in report.fresh)
        assert torch.equal(target[name], before[name])  # skipped: kept its fresh initialisation
        assert len(report.copied) > 100
        for n in report.copied:
            assert torch.equal(target[n], state[n])
        w = target["decoder.stage4.readout_conv.weight"]
        c4 = model.config.value_dims[2]
        assert torch.equal(w[:, :c4], state["decoder.stage4.readout_conv.weight"][:, :c4])  # G4's columns
        if setting == "A":
            assert "comparator" in " ".join(report.unused)
            assert w.shape[1] == c4
        assert "start fresh" in report.summary()
    with pytest.raises(LmrcError, match="not found"):
        transfer_weights(_model("F"), tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------------- a whole run

def test_a_run_on_every_data_kind_with_clips_and_distractors(tmp_path, monkeypatch):
    import io

    from PIL import Image

    from lmrc.train.trainer import train
    from test_data_video_masks import make_video_masks

    monkeypatch.setenv("LMRC_CACHE_DIR", str(tmp_path / "cache"))
    davis = make_tiny_davis2016(tmp_path / "davis", sequences=2, frames=6)
    videos = make_video_masks(tmp_path / "videos", count=6)
    images = tmp_path / "sod"
    for k in range(3):
        (images / "images").mkdir(parents=True, exist_ok=True)
        (images / "masks").mkdir(parents=True, exist_ok=True)
        rgb = np.full((48, 64, 3), 30, np.uint8)
        rgb[10:30, 10 + 5 * k:40 + 5 * k] = (200, 180, 40)
        Image.fromarray(rgb).save(images / "images" / f"{k}.jpg")
        Image.fromarray(((rgb[..., 0] > 100) * 255).astype(np.uint8), mode="L").save(images / "masks" / f"{k}.png")
    cfg = config_from_dict(tiny_config(davis, data={
        "datasets": [{"kind": "davis2016", "root": str(davis), "weight": 1.0},
                     {"kind": "video_masks", "root": str(videos), "weight": 1.0},
                     {"kind": "image_masks", "root": str(images), "weight": 1.0}],
        "holdout": ["seq1"], "num_frames": 4, "max_gap": 4, "distractor_prob": 0.5},
        clip={"mem_every": 2}, optim={"iterations": 2, "batch_size": 2, "precision": "fp32"},
        logging={"every": 1, "checkpoint_every": 1, "val_every": 0, "tensorboard": False, "progress_bar": False}))
    log = io.StringIO()
    result = train(cfg, tmp_path / "run", device_name="cpu", log_stream=log)
    assert result.step == 2 and (tmp_path / "run" / "final.safetensors").is_file()
    assert "3 source(s)" in log.getvalue() and "loss" in log.getvalue()
    assert "precision fp32 (config)" in log.getvalue()


def test_precision_auto_says_which_and_why(monkeypatch):
    import lmrc.utils.device as device_choice
    from lmrc.train.trainer import training_precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(device_choice, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    dtype, why = training_precision("auto", cpu)
    assert dtype is torch.bfloat16 and "AVX512_BF16" in why
    assert training_precision("bf16", cpu) == (torch.bfloat16, "bf16 (config)")
    monkeypatch.setattr(device_choice, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    dtype, why = training_precision("auto", cpu)
    assert dtype is None and "no native bf16" in why
    assert "slower" in training_precision("bf16", cpu)[1]  # emulated: said in the log
    with pytest.raises(LmrcError, match="fp16 needs a CUDA GPU"):
        training_precision("fp16", cpu)
    assert training_precision("fp32", cpu) == (None, "fp32 (config)")


def test_a_bf16_clip_step_gives_finite_loss_and_gradients():
    from lmrc.train.trainer import training_loss

    model = _model("F")
    images, masks, valid = _clip(4)
    cfg = config_from_dict(tiny_config(Path("unused"), data={"num_frames": 4, "max_gap": 3}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = clip_forward(model, images, masks[:, 0], valid, mem_every=2)
    loss, parts = training_loss(out, masks, 0, cfg)
    loss.backward()
    assert np.isfinite(parts["total"]) and parts["scale"] >= 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and all(g.dtype == torch.float32 for g in grads)


def test_runs_started_before_the_new_options_still_resume(tmp_path):
    from lmrc.train.config import config_to_dict
    from lmrc.train.trainer import CHECKPOINT_FORMAT, load_checkpoint

    root = make_tiny_davis2016(tmp_path / "d", sequences=1)
    cfg = config_from_dict(tiny_config(root))
    old = config_to_dict(cfg)
    del old["clip"], old["data"]["num_frames"], old["data"]["distractor_prob"], old["init"]["transfer_from"]
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "config": old, "step": 3}, path)
    assert load_checkpoint(path, cfg)["step"] == 3  # absent options had their defaults
    clips = config_from_dict(tiny_config(root, data={"num_frames": 4}))
    with pytest.raises(LmrcError, match="data.num_frames"):
        load_checkpoint(path, clips)
