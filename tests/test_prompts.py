"""Masks from prompts (GrabCut seeded by a box, clicks and strokes): known-answer synthetic scenes, input errors,
and a real DAVIS frame."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmrc.errors import LmrcError
from lmrc.inference.prompts import box_around, mask_from_prompts, next_click

H, W = 96, 128


def shared_data() -> Path | None:
    """../shared/data beside the repository (or beside the worktrees folder), None where absent."""
    for parent in Path(__file__).resolve().parents[1:4]:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return None


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy red disk (radius 24, centre (50, 48)) on a noisy blue/green checkerboard -> (rgb, disk mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    check = ((yy // 6 + xx // 6) % 2).astype(bool)
    image = np.zeros((H, W, 3), np.float64)
    image[check], image[~check] = (40, 90, 160), (30, 140, 70)
    disk = (yy - 48) ** 2 + (xx - 50) ** 2 < 24 ** 2
    image[disk] = (225, 50, 40)
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    return image, disk


def test_box_around_the_disk_gives_the_disk():
    image, disk = scene()
    mask = mask_from_prompts(image, box=box_around(disk, margin=3))
    assert mask.dtype == bool and mask.shape == (H, W)
    assert iou(mask, disk) >= 0.9
    # Deterministic: the same prompts give the same mask.
    np.testing.assert_array_equal(mask, mask_from_prompts(image, box=box_around(disk, margin=3)))


def test_a_click_or_a_stroke_alone_finds_the_disk():
    image, disk = scene(1)
    assert iou(mask_from_prompts(image, points=[(50, 48, True)]), disk) >= 0.9
    assert iou(mask_from_prompts(image, strokes=[([(40, 48), (60, 48)], 4, True)]), disk) >= 0.9


def with_red_region(seed: int, rows: slice, columns: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scene(seed) with a second red region (the disk's colour) -> (rgb, disk, region)."""
    image, disk = scene(seed)
    region = np.zeros((H, W), bool)
    region[rows, columns] = True
    image[region] = (225, 50, 40)
    return image, disk, region


def test_negative_click_removes_a_wrongly_included_region():
    image, disk, square = with_red_region(2, slice(10, 40), slice(84, 114))  # apart from the disk, inside the box
    box = (22, 4, 120, 77)
    before = mask_from_prompts(image, box=box)
    assert (before & square).sum() > 0.8 * square.sum()  # GrabCut takes both red regions
    after = mask_from_prompts(image, box=box, points=[(99, 25, False)], previous=before)
    assert not (after & square).any() and iou(after, disk) >= 0.9


def test_eraser_stroke_cuts_an_attached_region_and_keeps_the_object():
    image, disk, bar = with_red_region(3, slice(42, 54), slice(70, 110))  # a red bar attached to the disk
    box = (22, 20, 112, 77)
    before = mask_from_prompts(image, box=box)
    assert (before & bar & ~disk).sum() > 0.8 * (bar & ~disk).sum()
    after = mask_from_prompts(image, box=box, strokes=[([(76, 48), (110, 48)], 7, False)], previous=before)
    assert not (after & bar & ~disk).any() and iou(after, disk) >= 0.9


def test_next_click_goes_deepest_into_the_largest_error():
    truth = np.zeros((H, W), bool)
    truth[20:60, 20:60] = True
    missed = truth.copy()
    missed[20:60, 40:60] = False  # right half missed: a positive click in its middle
    x, y, positive = next_click(missed, truth)
    assert positive and 45 <= x <= 54 and 25 <= y <= 54
    extra = truth.copy()
    extra[70:90, 90:120] = True  # background taken: a negative click there
    x, y, positive = next_click(extra, truth)
    assert not positive and 90 <= x < 120 and 70 <= y < 90
    assert next_click(truth, truth) is None


@pytest.mark.parametrize("prompts, message", [
    ({}, "no prompt"),
    ({"box": (200, 10, 300, 50)}, "outside the 128x96 frame"),
    ({"box": (-50, -40, -1, -2)}, "outside the 128x96 frame"),
    ({"box": (40, 30, 40, 60)}, "is empty"),
    ({"box": (60, 30, 20, 60)}, "is empty"),
    ({"box": (1, 2, 3)}, "four numbers"),
    ({"points": [(130, 10, True)]}, "outside the 128x96 frame"),
    ({"box": (10, 10, 50, 50), "previous": np.zeros((10, 10), bool)}, "previous mask is 10x10"),
])
def test_bad_prompts_are_clear_errors(prompts, message):
    image, _ = scene()
    with pytest.raises(LmrcError, match=message):
        mask_from_prompts(image, **prompts)


def test_bad_image_is_a_clear_error():
    with pytest.raises(LmrcError, match="H x W x 3 uint8"):
        mask_from_prompts(np.zeros((H, W), np.uint8), box=(1, 1, 20, 20))


def test_box_over_the_whole_frame_takes_the_rim_as_background():
    image, disk = scene(4)
    assert iou(mask_from_prompts(image, box=(0, 0, W, H)), disk) >= 0.9
    assert iou(mask_from_prompts(image, box=(-10, -10, W + 10, H + 10), points=[(50, 48, True)]), disk) >= 0.9


def test_box_sticking_out_is_clipped():
    image, disk = scene()
    x0, y0, x1, y1 = box_around(disk, margin=3)
    assert iou(mask_from_prompts(image, box=(x0, y0, x1 + 500, y1)), mask_from_prompts(image, box=(x0, y0, W, y1))) == 1


def test_real_davis_frame():
    data = shared_data()
    if data is None or not (data / "davis2016" / "JPEGImages" / "480p" / "bear").is_dir():
        pytest.skip("DAVIS 2016 (../shared/data/davis2016) not found")
    from PIL import Image

    from lmrc.data.masks import read_mask

    frame = np.asarray(Image.open(data / "davis2016" / "JPEGImages" / "480p" / "bear" / "00000.jpg").convert("RGB"))
    truth = read_mask(data / "davis2016" / "Annotations" / "480p" / "bear" / "00000.png") > 0
    box = box_around(truth, margin=5)
    mask = mask_from_prompts(frame, box=box)
    scores = [iou(mask, truth)]
    points = []
    for _ in range(3):
        points.append(next_click(mask, truth))
        mask = mask_from_prompts(frame, box=box, points=points)
        scores.append(iou(mask, truth))
    # Measured on this frame: 0.835 from the box, then 0.875, 0.903, 0.915 after each click.
    assert scores[0] >= 0.8 and scores[-1] >= 0.88 and scores[-1] > scores[0] + 0.04
