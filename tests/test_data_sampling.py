"""Training samples: frame gap and order, object choice, determinism, augmentation alignment, mixing, resuming."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lmrc.data.augment import ClipAugment
from lmrc.data.datasets import MixedDataset, VideoSequence, VOSTrainingDataset, read_davis2016
from lmrc.data.masks import write_mask
from lmrc.data.sampling import GapSchedule, TrainingIndexSampler, choose_frames, sample_rng
from lmrc.errors import LmrcError

REAL_DAVIS2016 = Path(__file__).resolve().parents[2] / "shared" / "data" / "davis2016"
CROP = (32, 32)


def square_sequence(root: Path, name: str, count: int = 20, objects_from: dict | None = None) -> VideoSequence:
    """Frames: dark background, a white square (object 1) moving right; optional extra objects from a frame on.

    PNG frames so pixel values are exact. `objects_from` maps object id -> first frame it appears in.
    """
    frames, masks = [], {}
    for i in range(count):
        image = np.full((48, 64, 3), 30, np.uint8)
        ids = np.zeros((48, 64), np.uint8)
        x = 8 + i % 20
        image[14:34, x:x + 20] = 230
        ids[14:34, x:x + 20] = 1
        for obj, start in (objects_from or {}).items():
            if i >= start:
                ids[2:10, 4 * obj:4 * obj + 4] = obj
        frame = root / name / f"{i:05d}.png"
        frame.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(frame)
        mask = root / name / f"{i:05d}_mask.png"
        write_mask(mask, ids)
        frames.append(frame)
        masks[i] = mask
    return VideoSequence(name, frames, masks, (1,), "test")


@pytest.fixture
def squares(tmp_path):
    return [square_sequence(tmp_path, "a"), square_sequence(tmp_path, "b")]


def test_choose_frames_gap_order_and_coverage():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(2000):
        picks = choose_frames(30, 10, rng)
        assert len(set(picks)) == 3 and picks == sorted(picks)
        assert picks[-1] - picks[0] <= 10
        seen.update(picks)
    assert seen == set(range(30))  # every frame can be drawn, ends included
    assert choose_frames(3, 2, rng) == [0, 1, 2]
    with pytest.raises(ValueError):
        choose_frames(30, 1, rng)
    with pytest.raises(ValueError):
        choose_frames(2, 10, rng)


def test_gap_schedule():
    schedule = GapSchedule(((0, 5), (100, 10), (300, 5)))
    assert [schedule.at(i) for i in (0, 99, 100, 299, 300, 10**6)] == [5, 5, 10, 10, 5, 5]
    assert GapSchedule.from_fractions(1000, [0, 0.5], [5, 20]).at(600) == 20
    with pytest.raises(ValueError):
        GapSchedule(((10, 5),))


def test_sample_shapes_dtypes_and_order(squares):
    ds = VOSTrainingDataset(squares, crop_size=CROP, max_gap=4, seed=3, length=7)
    assert len(ds) == 7
    for index in range(6):
        s = ds[index]
        assert s["images"].shape == (3, 3, 32, 32) and s["images"].dtype == torch.float32
        assert 0 <= float(s["images"].min()) and float(s["images"].max()) <= 1
        assert s["masks"].shape == (3, 2, 32, 32) and s["masks"].dtype == torch.float32
        assert set(s["masks"].unique().tolist()) <= {0.0, 1.0}
        assert s["valid_objects"].dtype == torch.bool and s["valid_objects"].tolist() == [True, False]
        assert float(s["masks"][0, 0].sum()) > 0 and float(s["masks"][:, 1].sum()) == 0  # padding slot empty
        frames = s["info"]["frames"].tolist()
        # global-memory frame, local-memory frame, query: different, in time order, within the gap
        assert frames[0] < frames[1] < frames[2] and frames[2] - frames[0] <= 4
        assert s["info"]["name"] in {"a", "b"}
        assert s["info"]["object_ids"].tolist() == [1, 0]
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["images"].shape == (2, 3, 3, 32, 32) and batch["info"]["frames"].shape == (2, 3)


def test_curriculum_follows_iteration(squares):
    ds = VOSTrainingDataset(squares, crop_size=CROP, max_gap=GapSchedule(((0, 2), (5, 19))), batch_size=4, seed=1,
                            augment=ClipAugment(crop_size=CROP, enabled=False))
    spans = [int(ds[i]["info"]["frames"][-1] - ds[i]["info"]["frames"][0]) for i in range(0, 40)]
    assert all(s == 2 for s in spans[:20])  # iterations 0-4: gap 2 means three consecutive frames
    assert max(spans[20:]) > 2


def test_deterministic_given_seed_and_index(squares):
    a = VOSTrainingDataset(squares, crop_size=CROP, seed=11)
    b = VOSTrainingDataset(squares, crop_size=CROP, seed=11)
    for index in (5, 0, 37):  # any order: a sample does not depend on the ones drawn before it
        sa, sb = a[index], b[index]
        assert torch.equal(sa["images"], sb["images"]) and torch.equal(sa["masks"], sb["masks"])
        assert torch.equal(sa["info"]["frames"], sb["info"]["frames"])
    c = VOSTrainingDataset(squares, crop_size=CROP, seed=12)
    assert not torch.equal(a[5]["images"], c[5]["images"])
    assert not torch.equal(a[5]["images"], a[6]["images"])


def test_each_epoch_visits_every_sequence(tmp_path):
    seqs = [square_sequence(tmp_path, n, count=4) for n in "pqrs"]
    ds = VOSTrainingDataset(seqs, crop_size=CROP, max_gap=3)
    for epoch in range(3):
        names = [ds.sequence_for(i).name for i in range(epoch * 4, epoch * 4 + 4)]
        assert sorted(names) == list("pqrs")


def test_masks_stay_aligned_with_images_after_augmentation(squares):
    # Square image region == object mask; strong augmentation must move both identically.
    augment = ClipAugment(crop_size=(40, 40), rotation=15, shear=10, grayscale_prob=0.5)
    ds = VOSTrainingDataset(squares, crop_size=(40, 40), augment=augment, seed=5)
    for index in range(12):
        s = ds[index]
        for t in range(3):
            bright = s["images"][t].mean(0) > 0.5
            mask = s["masks"][t, 0] > 0.5
            union = int((bright | mask).sum())
            if union < 40:
                continue  # object (nearly) left the crop in this frame
            iou = int((bright & mask).sum()) / union
            assert iou > 0.8, (index, t, iou)


def test_crop_keeps_a_small_object():
    ids = torch.zeros(3, 200, 300, dtype=torch.uint8)
    ids[:, 190:198, 5:13] = 1  # tiny object in a corner: most random crops miss it
    images = torch.zeros(3, 3, 200, 300, dtype=torch.uint8)
    augment = ClipAugment(crop_size=(64, 64), min_object_pixels=4, rotation=0, shear=0)
    for seed in range(10):
        _, out = augment(images, ids, [1], sample_rng(seed, 0))
        assert int((out[0] == 1).sum()) >= 4  # the 8 x 8 px object, seen through the smallest allowed box


def test_objects_chosen_among_first_frame_objects(tmp_path):
    # Objects 2 and 3 present from frame 0, object 4 appears at frame 15 only.
    seq = square_sequence(tmp_path, "multi", objects_from={2: 0, 3: 0, 4: 15})
    ds = VOSTrainingDataset([seq], crop_size=CROP, max_gap=3, min_object_pixels=1,
                            augment=ClipAugment(crop_size=CROP, enabled=False))
    chosen = set()
    for index in range(40):
        s = ds[index]
        ids = s["info"]["object_ids"].tolist()
        assert len(set(ids)) == 2 and s["valid_objects"].all()
        if int(s["info"]["frames"][0]) < 15:
            assert 4 not in ids
        chosen.update(ids)
    assert {1, 2, 3} <= chosen


def test_too_few_frames_or_bad_gap(tmp_path):
    short = square_sequence(tmp_path, "short", count=2)
    with pytest.raises(LmrcError, match="annotated frames"):
        VOSTrainingDataset([short])
    with pytest.raises(LmrcError, match="max_gap"):
        VOSTrainingDataset([square_sequence(tmp_path, "ok", count=5)], max_gap=1)


def test_mixed_dataset_weights_and_length(squares, tmp_path):
    other = [square_sequence(tmp_path, "c", count=6)]
    first = VOSTrainingDataset(squares, crop_size=CROP, seed=1, name="first")
    second = VOSTrainingDataset(other, crop_size=CROP, seed=2, name="second")
    mixed = MixedDataset([first, second], weights=[3, 1], length=50, seed=4)
    assert len(mixed) == 50
    share = np.mean([mixed.source_of(i) == 0 for i in range(4000)])
    assert 0.7 < share < 0.8
    s = mixed[7]
    assert s["info"]["source"] == ["first", "second"][mixed.source_of(7)]
    assert torch.equal(s["images"], MixedDataset([first, second], [3, 1], 50, seed=4)[7]["images"])


def test_training_index_sampler_resumes_and_splits_ranks():
    assert list(TrainingIndexSampler(10, start=6)) == [6, 7, 8, 9]
    ranks = [list(TrainingIndexSampler(11, start=3, rank=r, world_size=2)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == list(range(3, 11))
    assert len(TrainingIndexSampler(11, start=3, rank=1, world_size=2)) == len(ranks[1])


def test_real_davis2016_sample():
    if not REAL_DAVIS2016.is_dir():
        pytest.skip(f"real DAVIS 2016 data not found at {REAL_DAVIS2016}")
    seqs = read_davis2016(REAL_DAVIS2016, include=["bear"])
    s = VOSTrainingDataset(seqs, seed=0)[0]  # default 384 x 384 crop, max gap 10
    assert s["images"].shape == (3, 3, 384, 384) and s["masks"].shape == (3, 2, 384, 384)
    assert s["valid_objects"].tolist() == [True, False] and float(s["masks"][0, 0].sum()) > 0
    frames = s["info"]["frames"].tolist()
    assert frames == sorted(frames) and frames[2] - frames[0] <= 10


def test_mask_resize_is_centre_aligned_with_image():
    # torch's legacy 'nearest' would shift the mask by up to half a pixel against the bilinear image.
    ids = torch.zeros(3, 48, 64, dtype=torch.uint8)
    ids[:, 10:20, 30:41] = 1
    images = (ids * 255)[:, None].repeat(1, 3, 1, 1)
    out_images, out_ids = ClipAugment(crop_size=(37, 77), enabled=False)(images, ids, [1], sample_rng(0, 0))

    def centroid(weights):
        ys, xs = torch.meshgrid(torch.arange(37.0), torch.arange(77.0), indexing="ij")
        return float((weights * ys).sum() / weights.sum()), float((weights * xs).sum() / weights.sum())

    (my, mx), (iy, ix) = centroid(out_ids[0].float()), centroid(out_images[0, 0])
    # The mask can only quantise (about 0.25 px here); the legacy offset would be about 0.5 px.
    assert abs(my - iy) < 0.35 and abs(mx - ix) < 0.35
