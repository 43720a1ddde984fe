"""Training: configs, the loss recipe, frozen BN, resume exactness after SIGKILL, user errors."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from lmrc.errors import LmrcError
from lmrc.train.config import config_from_dict, load_config
from lmrc.train.trainer import ids_from_masks, lr_factor, set_train_mode, training_loss

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import make_tiny_davis2016, tiny_config, write_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable



@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_davis2016(tmp_path_factory.mktemp("tiny") / "davis2016")


def _tiny_model():
    from lmrc.config import model_config
    from lmrc.model.network import LMRC

    torch.manual_seed(0)
    return LMRC(model_config("lmrc-lite"), pretrained_backbone=False)


# --------------------------------------------------------------------------------------------- configs

SHIPPED = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "splits")  # splits: name lists


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO / "configs")) for p in SHIPPED])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.optim.batch_size >= 1 and cfg.data.datasets


def test_shipped_configs_exist():
    names = {str(p.relative_to(REPO / "configs")) for p in SHIPPED}
    assert {"lmrc-r50-paper.yaml", "lmrc-lite-davis2016.yaml", "lmrc-lite-davis2016-A.yaml",
            "lmrc-lite-davis2016-C.yaml"} <= names
    assert {f"ablation/{s}.yaml" for s in "ABCDEF"} <= names


def test_ablation_configs_differ_only_in_setting():
    from lmrc.config import to_dict

    base = to_dict(load_config(REPO / "configs/ablation/F.yaml"))
    for s in "ABCDE":
        other = to_dict(load_config(REPO / f"configs/ablation/{s}.yaml"))
        assert other["model"].pop("setting") == s
        base_copy = {**base, "model": {k: v for k, v in base["model"].items() if k != "setting"}}
        assert other == base_copy


@pytest.mark.parametrize("patch, key", [
    ({"optimm": {}}, "optimm"),
    ({"optim": {"learning_rate": 1e-4}}, "learning_rate"),
    ({"data": {"crop": [64, 64]}}, "crop"),
    ({"model": {"windows": 3}}, "windows"),
    ({"data": {"synthetic": {"statics": 0.1}}}, "statics"),
])
def test_unknown_config_key_is_rejected_by_name(tiny_data, tmp_path, patch, key):
    cfg = tiny_config(tiny_data)
    for section, value in patch.items():
        if isinstance(cfg.get(section), dict):
            cfg[section] = {**cfg[section], **value}
        else:
            cfg[section] = value
    path = write_config(tmp_path / "bad.yaml", cfg)
    with pytest.raises(LmrcError, match=key) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_unknown_dataset_key_is_rejected(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data)
    cfg["data"]["datasets"][0]["rooot"] = "x"
    with pytest.raises(LmrcError, match=r"datasets\[0\].*rooot"):
        load_config(write_config(tmp_path / "bad.yaml", cfg))


def test_base_key_merges_over_the_base_file(tiny_data, tmp_path):
    write_config(tmp_path / "base.yaml", tiny_config(tiny_data))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"base": "base.yaml", "model": {"setting": "C"},
                                                         "optim": {"lr": 0.5}}))
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.model.setting == "C" and cfg.optim.lr == 0.5
    assert cfg.optim.batch_size == 2 and cfg.model.backbone == "efficientnet_lite0"


def test_lr_schedule_warmup_step_and_cosine(tiny_data):
    cfg = config_from_dict(tiny_config(tiny_data, optim={"iterations": 100, "warmup_iterations": 10,
                                                         "schedule": "cosine", "min_lr_ratio": 0.1}))
    assert lr_factor(cfg, 0) == pytest.approx(0.1) and lr_factor(cfg, 9) == pytest.approx(1.0)
    assert lr_factor(cfg, 10) == pytest.approx(1.0) and lr_factor(cfg, 100) == pytest.approx(0.1)
    cfg = config_from_dict(tiny_config(tiny_data, optim={"iterations": 100, "schedule": "step",
                                                         "step_milestones": [0.5], "step_gamma": 0.1}))
    assert lr_factor(cfg, 49) == 1.0 and lr_factor(cfg, 50) == pytest.approx(0.1)
    cfg = config_from_dict(tiny_config(tiny_data, optim={"iterations": 100, "warmup_iterations": 10, "hold_until": 60,
                                                         "schedule": "cosine", "min_lr_ratio": 0.0}))
    assert lr_factor(cfg, 30) == 1.0 and lr_factor(cfg, 60) == 1.0
    assert lr_factor(cfg, 80) == pytest.approx(0.5) and lr_factor(cfg, 100) == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------------- the recipe

def _fake_output(b=2, n=2, h=16, w=16):
    keys = {r: torch.randn(b, 8, h // 2 ** (r - 2), w // 2 ** (r - 2)) for r in (2, 3, 4)}
    frame = SimpleNamespace(agg_logits=torch.randn(b, n + 1, h, w))
    return SimpleNamespace(local_frame=frame, query_frame=frame, query_keys=keys)


def test_scale_loss_only_for_the_first_k_iterations(tiny_data):
    cfg = config_from_dict(tiny_config(tiny_data, loss={"scale_loss_iterations": 1000, "beta": 1e-4}))
    out, masks = _fake_output(), (torch.rand(2, 3, 2, 16, 16) > 0.7).float()
    _, early = training_loss(out, masks, 999, cfg)
    _, late = training_loss(out, masks, 1000, cfg)
    assert "scale" in early and early["total"] == pytest.approx(early["ce"] + 1e-4 * early["scale"], rel=1e-5)
    assert "scale" not in late and late["total"] == pytest.approx(late["ce"])


def test_plain_ce_before_bootstrapping(tiny_data):
    cfg = config_from_dict(tiny_config(tiny_data, loss={"ce": "bootstrapped", "plain_ce_iterations": 10,
                                                        "scale_loss_iterations": 0}))
    out, masks = _fake_output(), (torch.rand(2, 3, 2, 16, 16) > 0.7).float()
    assert training_loss(out, masks, 11, cfg)[1]["ce"] > training_loss(out, masks, 9, cfg)[1]["ce"]


def test_ids_from_masks():
    masks = torch.zeros(1, 2, 2, 2)
    masks[0, 1, 0, 0] = 1
    masks[0, 0, 1, 1] = 1
    assert ids_from_masks(masks).tolist() == [[[2, 0], [0, 1]]]


def _one_sample(tiny_data):
    from lmrc.data.datasets import VOSTrainingDataset, read_davis2016

    ds = VOSTrainingDataset(read_davis2016(tiny_data), max_gap=3, crop_size=(64, 64), max_short_side=None, seed=1)
    s = ds[0]
    return s["images"][None], s["masks"][None], s["valid_objects"][None]


def test_frozen_bn_statistics_do_not_change(tiny_data):
    model = _tiny_model()
    set_train_mode(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns) and model.decoder.training
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    weights_before = bns[0].weight.detach().clone()
    images, masks, valid = _one_sample(tiny_data)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    cfg = config_from_dict(tiny_config(tiny_data))
    for step in range(2):
        loss, _ = training_loss(model(images, masks[:, 0], valid), masks, step, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(weights_before, bns[0].weight)  # the affine part still learns


def test_loss_decreases_when_overfitting_one_sample(tiny_data):
    model = _tiny_model()
    set_train_mode(model)
    images, masks, valid = _one_sample(tiny_data)
    cfg = config_from_dict(tiny_config(tiny_data, loss={"scale_loss_iterations": 0}))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    losses = []
    for step in range(20):
        loss, parts = training_loss(model(images, masks[:, 0], valid), masks, step, cfg)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(parts["total"])
    assert min(losses[-3:]) < 0.5 * losses[0], losses


# --------------------------------------------------------------------------------------------- CLI runs

def _lmrc_train(*args, cwd=None, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([PYTHON, "-m", "lmrc.cli", "train", "--threads", "1", *map(str, args)], cwd=cwd or REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _final_hash(run: Path, name: str = "final.safetensors") -> str:
    from lmrc.model.weights import read_weights_metadata

    return read_weights_metadata(run / name)["sha256"]


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_data, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(
        tiny_data, optim={"iterations": 8, "batch_size": 1},
        logging={"every": 1, "checkpoint_every": 2, "weights_every": 4, "val_every": 0, "tensorboard": False,
                 "progress_bar": False}))
    reference = _lmrc_train("--config", cfg, "--out", tmp_path / "ref")
    killed = _lmrc_train("--config", cfg, "--out", tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    deadline = time.time() + 90
    while not checkpoint.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert checkpoint.exists() and not (tmp_path / "run" / "final.safetensors").exists(), "killed too late"
    resumed = _lmrc_train("--config", cfg, "--out", tmp_path / "run", "--resume")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert "resumed" in out
    ref_out, ref_err = reference.communicate(timeout=120)
    assert reference.returncode == 0, ref_err
    assert _final_hash(tmp_path / "run") == _final_hash(tmp_path / "ref")
    exported = _lmrc_train("--config", cfg, "--out", tmp_path / "ref", "--export-weights", tmp_path / "export.safetensors")
    assert exported.communicate(timeout=120)[0].startswith(f"wrote {tmp_path / 'export.safetensors'}: the model at step 8")
    assert _final_hash(tmp_path, "export.safetensors") == _final_hash(tmp_path / "ref")
    kept = sorted(p.name for p in (tmp_path / "ref" / "weights").iterdir())
    assert kept == ["step-000004.safetensors", "step-000008.safetensors"]
    assert _final_hash(tmp_path / "ref", f"weights/{kept[-1]}") == _final_hash(tmp_path / "ref")


@pytest.mark.parametrize("workers", [0, 1])
def test_sigterm_finishes_the_step_saves_and_exits(tiny_data, tmp_path, workers):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(
        tiny_data, optim={"iterations": 200, "batch_size": 1}, data={"workers": workers},
        logging={"every": 1, "checkpoint_every": 1000, "val_every": 0, "tensorboard": False, "progress_bar": False}))
    proc = _lmrc_train("--config", cfg, "--out", tmp_path / "run", start_new_session=True)
    for line in proc.stdout:
        if "step 1/" in line:
            break
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: the whole group, data workers included
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by signal" in out and "Traceback" not in err
    payload = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert 1 <= payload["step"] < 200 and payload["data_position"] == payload["step"]


def _run_cli(*argv) -> tuple[int, str]:
    from lmrc import cli

    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        code = cli.main(["train", *map(str, argv)])
    return code, err.getvalue()


def test_missing_dataset_path_is_one_clear_error(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "nowhere"))
    code, err = _run_cli("--config", cfg, "--out", tmp_path / "run")
    assert code == 2 and "nowhere" in err and "Traceback" not in err


def test_sequence_with_frames_but_no_masks_is_one_clear_error(tmp_path):
    root = make_tiny_davis2016(tmp_path / "d", sequences=2, frames=4)
    for mask in (root / "Annotations" / "480p" / "seq1").iterdir():
        mask.unlink()
    code, err = _run_cli("--config", write_config(tmp_path / "c.yaml", tiny_config(root)), "--out", tmp_path / "run")
    assert code == 2 and "seq1" in err


def test_empty_dataset_is_one_clear_error(tmp_path):
    root = tmp_path / "empty"
    (root / "JPEGImages" / "480p").mkdir(parents=True)
    cfg = tiny_config(root)
    cfg["data"]["datasets"][0]["split"] = None
    code, err = _run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--out", tmp_path / "run")
    assert code == 2 and "no sequence" in err


def test_unknown_key_through_the_cli(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data)
    cfg["optim"]["lrr"] = 1
    code, err = _run_cli("--config", write_config(tmp_path / "c.yaml", cfg))
    assert code == 2 and "lrr" in err


def test_resume_with_another_config_is_refused(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, optim={"iterations": 1, "batch_size": 1})
    code, err = _run_cli("--config", write_config(tmp_path / "a.yaml", cfg), "--out", tmp_path / "run", "--threads", 1)
    assert code == 0, err
    cfg["optim"]["lr"] = 0.5
    code, err = _run_cli("--config", write_config(tmp_path / "b.yaml", cfg), "--out", tmp_path / "run", "--resume")
    assert code == 2 and "optim.lr" in err and "another config" in err
    # what is validated, the run length and where its decay starts (a run cut short) never change what was trained
    cfg["optim"]["lr"], cfg["optim"]["iterations"], cfg["optim"]["hold_until"] = 1e-3, 2, 1
    cfg["data"]["validation"] = {"video_frames": None, "short_side": 64}
    code, err = _run_cli("--config", write_config(tmp_path / "c.yaml", cfg), "--out", tmp_path / "run", "--resume")
    assert code == 0, err
    code, err = _run_cli("--config", tmp_path / "a.yaml", "--out", tmp_path / "run")
    assert code == 2 and "--resume" in err


def test_frozen_parameters_stay_fixed_and_typos_are_refused(tiny_data):
    from lmrc.train.trainer import freeze_parameters

    model = _tiny_model()
    set_train_mode(model)
    count = freeze_parameters(model, ["key_encoder.trunk.stem", "key_encoder.trunk.blocks.0"])
    assert count == sum(p.numel() for n, p in model.named_parameters() if n.startswith(("key_encoder.trunk.stem.", "key_encoder.trunk.blocks.0.")))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert "key_encoder.trunk.blocks.0._depthwise_conv.weight" in frozen and "key_encoder.trunk.blocks.1._depthwise_conv.weight" not in frozen
    learned = model.key_encoder.trunk.blocks[1]._depthwise_conv.weight.detach().clone()
    images, masks, valid = _one_sample(tiny_data)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-3)
    cfg = config_from_dict(tiny_config(tiny_data))
    loss, _ = training_loss(model(images, masks[:, 0], valid), masks, 0, cfg)
    loss.backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.equal(learned, model.key_encoder.trunk.blocks[1]._depthwise_conv.weight)
    with pytest.raises(LmrcError, match="names no parameter"):
        freeze_parameters(model, ["key_encoder.trunk.stemm"])


def test_init_grow_from_starts_a_larger_setting_from_a_smaller_ones_weights(tiny_data, tmp_path):
    from lmrc.config import model_config
    from lmrc.errors import LmrcError
    from lmrc.model.network import LMRC
    from lmrc.model.weights import save_weights
    from lmrc.train.config import validate
    from lmrc.train.trainer import build_model

    torch.manual_seed(3)
    small = LMRC(model_config("lmrc-lite", setting="A"), pretrained_backbone=False)
    path = tmp_path / "A.safetensors"
    save_weights(small, path)
    cfg = config_from_dict(tiny_config(tiny_data, init={"grow_from": str(path)}))
    model = build_model(cfg, log=lambda _: None)
    assert model.config.setting == "F"
    torch.testing.assert_close(model.key_encoder.state_dict(), small.key_encoder.state_dict())
    assert not model.decoder.stage3.readout_conv.weight.any()
    cfg.init.grow_from = str(tmp_path / "missing.safetensors")
    with pytest.raises(LmrcError, match="missing.safetensors not found"):
        build_model(cfg, log=lambda _: None)
    with pytest.raises(LmrcError, match="not both"):
        validate(config_from_dict(tiny_config(tiny_data, init={"grow_from": str(path), "weights": str(path)})))


def test_video_validation_scores_whole_videos_as_lmrc_eval_does(tiny_data, tmp_path, monkeypatch):
    """A stand-in segmenter that copies the first mask must score what `lmrc baseline copy` + `lmrc eval` score."""
    import lmrc.inference.segmenter as segmenter_module
    from lmrc.data.datasets import read_dataset
    from lmrc.eval.baselines import run_dataset
    from lmrc.eval.davis import evaluate
    from lmrc.errors import LmrcError
    from lmrc.train.config import validate
    from lmrc.train.trainer import validate_videos

    class CopyFirstMask:
        def __init__(self, model, **settings):
            self.reset()

        def reset(self):
            self.object_ids, self.first = [], None

        def probs_to_ids(self, probs):
            return np.array([0, *self.object_ids], np.uint8)[probs.argmax(0).numpy()]

        def step(self, frame, mask=None):
            if mask is not None:
                self.object_ids = [int(i) for i in np.unique(mask) if i]
                self.first = np.asarray(mask)
            probs = np.stack([self.first == 0] + [self.first == i for i in self.object_ids]).astype(np.float32)
            return torch.from_numpy(probs)

    monkeypatch.setattr(segmenter_module, "Segmenter", CopyFirstMask)
    names = ["seq0", "seq1", "seq2"]
    sequences = read_dataset("davis2016", str(tiny_data), split="train", include=names)
    cfg = config_from_dict(tiny_config(tiny_data, data={"validation": {"video_frames": None}}))
    scores = validate_videos(None, sequences, cfg, torch.device("cpu"))
    run_dataset("copy", tiny_data, names, tmp_path / "copy", workers=1)
    official = evaluate(tmp_path / "copy", tiny_data, split="train", year=2016, sequences=names, workers=1).global_scores()
    assert scores["val/JF"] == pytest.approx(official["J&F-Mean"], abs=1e-9)
    assert scores["val/J"] == pytest.approx(official["J-Mean"], abs=1e-9) and scores["val/J"] < 0.9
    # a prefix of each video scores frames 1..T-1 of the prefix: the square has moved less there
    cfg.data.validation.video_frames = 3
    assert validate_videos(None, sequences, cfg, torch.device("cpu"))["val/J"] > scores["val/J"]
    with pytest.raises(LmrcError, match="video_frames must be >= 0"):
        validate(config_from_dict(tiny_config(tiny_data, data={"validation": {"video_frames": -1}})))
