"""Synthetic sources: warped static-image clips and pasted occluding objects keep masks on their pixels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from lmrc.data.augment import ClipAugment
from lmrc.data.datasets import MixedDataset, VideoSequence, VOSTrainingDataset
from lmrc.data.masks import write_mask
from lmrc.data.sampling import sample_rng
from lmrc.data.synthetic import PastedObjectClips, StaticImageClips, annotated_frames, paste_object, random_warp

CROP = (40, 40)


def rect_sequence(root: Path, name: str, colour, count: int = 8, box=(14, 34, 20, 44)) -> VideoSequence:
    """Dark frames with a coloured rectangle (object 1) drifting right by one pixel a frame; PNG, exact pixels."""
    y0, y1, x0, x1 = box
    frames, masks = [], {}
    for i in range(count):
        image = np.full((48, 64, 3), 20, np.uint8)
        ids = np.zeros((48, 64), np.uint8)
        image[y0:y1, x0 + i:x1 + i] = colour
        ids[y0:y1, x0 + i:x1 + i] = 1
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / name / f"{i:05d}.png")
        write_mask(root / name / f"{i:05d}_m.png", ids)
        frames.append(root / name / f"{i:05d}.png")
        masks[i] = root / name / f"{i:05d}_m.png"
    return VideoSequence(name, frames, masks, (1,), "test")


def erode(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3 x 3 neighbourhood is all inside `mask`."""
    outside = (~mask).float()[None, None]
    return torch.nn.functional.max_pool2d(outside, 3, stride=1, padding=1)[0, 0] == 0


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return int((a & b).sum()) / max(1, int((a | b).sum()))


def test_random_warp_moves_image_and_mask_together():
    image = torch.full((3, 64, 80), 20, dtype=torch.uint8)
    ids = torch.zeros(64, 80, dtype=torch.uint8)
    image[:, 16:48, 20:60] = 230
    ids[16:48, 20:60] = 1
    moved = 0
    for seed in range(8):
        warped, warped_ids = random_warp(image, ids, sample_rng(seed, 0), rotation=25, shear=10, elastic_alpha=0.03)
        assert warped.dtype == torch.uint8 and warped_ids.dtype == torch.uint8
        assert set(warped_ids.unique().tolist()) <= {0, 1}  # ids resampled with nearest neighbour
        bright, mask = warped.float().mean(0) > 125, warped_ids == 1
        assert iou(bright, mask) > 0.9
        moved += iou(mask, ids == 1) < 0.95
    assert moved >= 6  # the warp does change the shape


def test_static_image_clips(tmp_path):
    seq = rect_sequence(tmp_path, "still", (230, 230, 230))
    ds = StaticImageClips(annotated_frames([seq], stride=3), crop_size=CROP, seed=4, length=10)
    assert len(ds) == 10 and len(ds.sources) == 3
    for index in range(4):
        s = ds[index]
        assert s["images"].shape == (3, 3, 40, 40) and s["masks"].shape == (3, 2, 40, 40)
        assert s["valid_objects"].tolist() == [True, False]
        assert s["info"]["name"].startswith("static:still/") and s["info"]["frames"].tolist() == [0, 0, 0]
        assert not torch.equal(s["masks"][0], s["masks"][1])  # each frame has its own warp
        for t in range(3):
            bright, mask = s["images"][t].mean(0) > 0.5, s["masks"][t, 0] > 0.5
            assert iou(bright, mask) > 0.8, (index, t)
    again = StaticImageClips(annotated_frames([seq], stride=3), crop_size=CROP, seed=4, length=10)
    assert torch.equal(ds[3]["images"], again[3]["images"]) and torch.equal(ds[3]["masks"], again[3]["masks"])


def test_paste_object_occludes_object_one():
    # Base: large red object 1 (nearly the whole frame, so any placement overlaps it); donor: green square.
    base = torch.full((3, 3, 48, 64), 20, dtype=torch.uint8)
    base_ids = torch.zeros(3, 48, 64, dtype=torch.uint8)
    base[:, 0, 4:44, 4:60] = 220
    base_ids[:, 4:44, 4:60] = 1
    donor = torch.full((3, 3, 48, 64), 20, dtype=torch.uint8)
    donor_ids = torch.zeros(3, 48, 64, dtype=torch.uint8)
    for t in range(3):
        donor[t, 1, 16:32, 20 + 2 * t:36 + 2 * t] = 220
        donor_ids[t, 16:32, 20 + 2 * t:36 + 2 * t] = 3  # donor's own object id 3 becomes id 2
    for seed in range(5):
        images, ids = paste_object(base, base_ids, 1, donor, donor_ids, 3, sample_rng(seed, 0), min_visible=0.3)
        for t in range(3):
            pasted = ids[t] == 2
            assert int(pasted.sum()) > 20
            assert int((pasted & (base_ids[t] == 1)).sum()) > 0  # it covers part of object 1 ...
            assert not bool(((ids[t] == 1) & pasted).any())  # ... whose mask loses those pixels
            assert int((ids[t] == 1).sum()) >= 0.3 * int((base_ids[t] == 1).sum())
            # pixels labelled 2 show the donor's (green) pixels, pixels labelled 1 the base's red ones
            green = images[t, 1].int() > images[t, 0].int()
            assert float(green[pasted].float().mean()) > 0.9
            assert float((images[t, 0][ids[t] == 1] > 150).float().mean()) > 0.9


def test_pasted_object_clips_sample(tmp_path):
    base = [rect_sequence(tmp_path, "red", (220, 30, 30), box=(6, 42, 6, 50))]
    donors = [rect_sequence(tmp_path, "green", (30, 220, 30), box=(16, 30, 20, 34))]
    ds = PastedObjectClips(base, donors, crop_size=CROP, max_gap=4, seed=2, length=6,
                           augment=ClipAugment(crop_size=CROP, grayscale_prob=0.0))
    for index in range(4):
        s = ds[index]
        assert s["images"].shape == (3, 3, 40, 40) and s["masks"].shape == (3, 2, 40, 40)
        assert s["info"]["name"] == "red+green" and s["info"]["object_ids"].tolist() == [1, 2]
        assert s["valid_objects"].tolist() == [True, True]
        assert float((s["masks"][:, 0] * s["masks"][:, 1]).sum()) == 0  # one label per pixel
        frames = s["info"]["frames"].tolist()
        assert frames == sorted(frames) and frames[2] - frames[0] <= 4
        img = s["images"]
        for t in range(3):
            inner = erode(s["masks"][t, 1] > 0.5)  # edge pixels blend with the background under bilinear warps
            if int(inner.sum()) > 4:
                assert float((img[t, 1][inner] > img[t, 0][inner]).float().mean()) > 0.9  # green where object 2


def test_synthetic_and_real_mix_into_one_batch(tmp_path):
    seqs = [rect_sequence(tmp_path, "a", (230, 230, 230)), rect_sequence(tmp_path, "b", (30, 230, 30))]
    real = VOSTrainingDataset(seqs, crop_size=CROP, max_gap=4, seed=1, name="real")
    static = StaticImageClips(annotated_frames(seqs), crop_size=CROP, seed=2)
    paste = PastedObjectClips(seqs, crop_size=CROP, max_gap=4, seed=3)
    samples = [real[0], static[0], paste[0]]
    assert all(s.keys() == samples[0].keys() and s["info"].keys() == samples[0]["info"].keys() for s in samples)
    batch = default_collate(samples)
    assert batch["images"].shape == (3, 3, 3, 40, 40) and batch["valid_objects"].shape == (3, 2)
    assert batch["info"]["source"] == ["real", "static", "paste"]
    mixed = MixedDataset([real, static, paste], weights=[2, 1, 1], length=20, seed=9)
    assert {mixed[i]["info"]["source"] for i in range(12)} == {"real", "static", "paste"}
