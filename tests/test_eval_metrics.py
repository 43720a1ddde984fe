"""J, F and the per-object statistics against values worked out by hand from the official definitions."""
import numpy as np
import pytest

from lmrc.eval.metrics import (
    boundary_map,
    contour_accuracy,
    decay_bins,
    disk,
    region_similarity,
    score_objects,
    statistics,
    tolerance_radius,
)


def square(top, left, size=10, shape=(100, 100)):
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def test_tolerance_radius_and_disk():
    assert tolerance_radius(480, 854) == 8  # ceil(0.008 * 979.6)
    assert tolerance_radius(100, 100) == 2  # ceil(0.008 * 141.4) = ceil(1.13)
    assert tolerance_radius(100, 100, bound_th=3) == 3  # >= 1 means pixels
    k = disk(2)
    assert k.shape == (5, 5) and k.sum() == 13  # dx^2 + dy^2 <= 4: 1 + 3 + 5 + 3 + 1


def test_boundary_of_a_square_is_a_one_pixel_outline():
    # Rows 10..19, cols 10..19: the outline runs on rows 9 and 19 and columns 9 and 19 (outside on the
    # top/left, inside on the bottom/right): an 11 x 11 ring of 40 pixels.
    b = boundary_map(square(10, 10))
    assert b.sum() == 40
    ring = np.zeros_like(b)
    ring[9:20, 9:20] = True
    ring[10:19, 10:19] = False
    assert np.array_equal(b, ring)


def test_boundary_at_the_image_edge():
    # Bottom-right corner: nothing beyond the image counts, so only the top (row 89, cols 89..99) and the left
    # (col 89, rows 90..99) sides remain: 11 + 10.
    assert boundary_map(square(90, 90)).sum() == 21
    # Top-left corner: bottom row 9 and right column 9 (inside), 10 + 10 - 1 shared corner.
    assert boundary_map(square(0, 0)).sum() == 19
    # A mask filling the image has no boundary at all.
    assert boundary_map(np.ones((20, 30), bool)).sum() == 0


def test_square_offset_by_five_pixels():
    gt, pred = square(10, 10), square(10, 15)
    assert region_similarity(gt, pred) == pytest.approx(50 / 150)
    # Radius 2. Of the 40 prediction boundary pixels, matched within 2 px of the ground-truth ring: rows 9 and 19
    # at cols 14..21 (16) and col 14 at rows 10, 11, 17, 18 (4) -> P = 20/40; R = 0.5 by symmetry; F = 0.5.
    assert contour_accuracy(gt, pred) == pytest.approx(0.5)


def test_square_offset_by_one_pixel():
    gt, pred = square(10, 10), square(11, 10)
    assert region_similarity(gt, pred) == pytest.approx(90 / 110)
    assert contour_accuracy(gt, pred) == pytest.approx(1.0)  # every boundary pixel within the 2 px tolerance


def test_extra_blob_lowers_precision_only():
    gt = square(10, 10)
    pred = gt | square(70, 70, size=4)
    assert region_similarity(gt, pred) == pytest.approx(100 / 116)
    # Prediction boundary: 40 (matched) + 16 for the 4x4 blob (unmatched): P = 40/56, R = 1, F = 2P/(P+1) = 5/6.
    assert contour_accuracy(gt, pred) == pytest.approx(5 / 6)
    assert contour_accuracy(pred, gt) == pytest.approx(5 / 6)  # swapping roles swaps P and R


def test_empty_cases():
    empty, obj = np.zeros((100, 100), bool), square(10, 10)
    assert region_similarity(obj, empty) == 0 and contour_accuracy(obj, empty) == 0  # P = 1, R = 0
    assert region_similarity(empty, obj) == 0 and contour_accuracy(empty, obj) == 0  # P = 0, R = 1
    assert region_similarity(empty, empty) == 1 and contour_accuracy(empty, empty) == 1
    # The official quirk: a full-frame object has no boundary, so F = 1 even against an empty prediction.
    full = np.ones((100, 100), bool)
    assert region_similarity(full, empty) == 0 and contour_accuracy(full, empty) == 1


def test_stack_matches_frame_by_frame():
    rng = np.random.default_rng(0)
    gt = rng.random((5, 40, 50)) > 0.7
    pred = rng.random((5, 40, 50)) > 0.7
    gt[2] = pred[2] = False
    j, f = region_similarity(gt, pred), contour_accuracy(gt, pred)
    assert j.shape == f.shape == (5,)
    for t in range(5):
        assert j[t] == pytest.approx(float(region_similarity(gt[t], pred[t])))
        assert f[t] == pytest.approx(float(contour_accuracy(gt[t], pred[t])))
    assert j[2] == f[2] == 1


def test_decay_bins():
    # linspace(1, 10, 5) = 1, 3.25, 5.5, 7.75, 10 -> round 1, 3, 6, 8, 10 -> minus 1: 0, 2, 5, 7, 9 (stop inclusive)
    assert decay_bins(10) == [(0, 3), (2, 6), (5, 8), (7, 10)]
    # linspace(1, 5, 5) = 1..5: ties never arise; consecutive bins share an edge frame
    assert decay_bins(5) == [(0, 2), (1, 3), (2, 4), (3, 5)]
    # linspace(1, 4, 5) = 1, 1.75, 2.5, 3.25, 4: 2.5 rounds up (the official +1e-10) -> 0, 1, 2, 2, 3
    assert decay_bins(4) == [(0, 2), (1, 3), (2, 3), (2, 4)]
    assert decay_bins(1) == [(0, 1)] * 4
    edges = decay_bins(300)  # longer than 256 frames: no uint8 wrap-around
    assert edges[0][0] == 0 and edges[-1][1] == 300 and all(a < b for a, b in edges)


def test_statistics_on_known_series():
    mean, recall, decay = statistics([1.0] * 5 + [0.0] * 5)
    assert (mean, recall, decay) == pytest.approx((0.5, 0.5, 1.0))  # first bin frames 0..2, last bin 7..9
    mean, recall, decay = statistics(np.arange(10) / 9)
    assert mean == pytest.approx(0.5)
    assert recall == pytest.approx(0.5)  # 5/9 .. 9/9 are > 0.5
    assert decay == pytest.approx((0 + 1 + 2) / 27 - (7 + 8 + 9) / 27)
    assert statistics([0.5, 0.5, 0.51])[1] == pytest.approx(1 / 3)  # recall is strictly above 0.5
    assert statistics([0.7]) == pytest.approx((0.7, 1.0, 0.0))


def test_objects_present_in_only_some_frames():
    gt = np.zeros((3, 100, 100), np.uint8)
    pred = np.zeros_like(gt)
    gt[:, 10:20, 10:20] = 1
    pred[:, 10:20, 10:20] = 1
    gt[0, 50:60, 50:60] = 2  # object 2 leaves after frame 0
    pred[0, 50:60, 50:60] = 2
    pred[2, 50:60, 50:60] = 2  # ... but the prediction brings it back on frame 2
    j, f = score_objects(gt, pred, 2)
    assert j.shape == (2, 3)
    assert np.allclose(j[0], 1) and np.allclose(f[0], 1)
    assert np.allclose(j[1], [1, 1, 0])  # absent in both: 1; predicted but absent: 0
    assert np.allclose(f[1], [1, 1, 0])
