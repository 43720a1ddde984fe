"""DAVIS region similarity J and contour accuracy F, with the per-object statistics of the official protocol.

Definitions follow the official davis2017-evaluation code (see docs/REFERENCE §3); any deviation is noted where it
is made. Masks are boolean `T x H x W` stacks (one object, T frames); scores are float64 arrays of length T.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

BOUNDARY_TOLERANCE = 0.008  # fraction of the image diagonal (8 pixels at 854x480)
RECALL_THRESHOLD = 0.5
DECAY_BINS = 4


def region_similarity(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """J = |S n G| / |S u G| per frame; 1 where both masks are empty.

    gt, pred: T x H x W (or H x W) boolean masks of one object. Returns T floats (or a 0-d array).
    """
    gt, pred = _as_bool_pair(gt, pred)
    inter = np.count_nonzero(gt & pred, axis=(-2, -1))
    union = np.count_nonzero(gt | pred, axis=(-2, -1))
    # Dividing only where the union is non-empty avoids 0/0 warnings; empty union counts as a perfect match.
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def boundary_map(masks: np.ndarray) -> np.ndarray:
    """1-pixel boundaries: a pixel is boundary if it differs from its east, south or south-east neighbour.

    masks: ... x H x W boolean. Neighbours outside the image do not count (the last row compares only with the
    east neighbour, the last column only with the south one, the bottom-right pixel is never boundary), so an
    object touching the bottom or right edge has no boundary along that edge.
    """
    m = np.asarray(masks, dtype=bool)
    b = np.zeros_like(m)
    b[..., :-1, :-1] = (m[..., :-1, :-1] != m[..., :-1, 1:]) | (m[..., :-1, :-1] != m[..., 1:, :-1]) | (
        m[..., :-1, :-1] != m[..., 1:, 1:]
    )
    b[..., -1, :-1] = m[..., -1, :-1] != m[..., -1, 1:]
    b[..., :-1, -1] = m[..., :-1, -1] != m[..., 1:, -1]
    return b


def tolerance_radius(height: int, width: int, bound_th: float = BOUNDARY_TOLERANCE) -> int:
    """Dilation radius in pixels: `bound_th` itself if >= 1, else ceil(bound_th * image diagonal)."""
    if bound_th >= 1:
        return int(bound_th)
    return int(math.ceil(bound_th * math.hypot(height, width)))


def disk(radius: int) -> np.ndarray:
    """(2r+1) x (2r+1) uint8 structuring element: the offsets with dx^2 + dy^2 <= r^2."""
    offsets = np.arange(-radius, radius + 1)
    return ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius**2).astype(np.uint8)


def contour_accuracy(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUNDARY_TOLERANCE) -> np.ndarray:
    """F = 2PR / (P + R) of the boundary maps, each matched within a disk of `tolerance_radius` pixels.

    gt, pred: T x H x W (or H x W) boolean masks of one object. Returns T floats (or a 0-d array).
    P = |B_S n dil(B_G)| / |B_S|, R = |B_G n dil(B_S)| / |B_G|; both boundaries empty: P = R = 1;
    only B_G empty: P = 0, R = 1; only B_S empty: P = 1, R = 0; F = 0 when P + R = 0.
    """
    gt, pred = _as_bool_pair(gt, pred)
    squeeze = gt.ndim == 2
    if squeeze:
        gt, pred = gt[None], pred[None]
    kernel = disk(tolerance_radius(gt.shape[-2], gt.shape[-1], bound_th))
    b_gt, b_pred = boundary_map(gt), boundary_map(pred)
    n_gt = np.count_nonzero(b_gt, axis=(-2, -1))
    n_pred = np.count_nonzero(b_pred, axis=(-2, -1))
    pred_matched = np.zeros(len(gt), dtype=np.int64)
    gt_matched = np.zeros(len(gt), dtype=np.int64)
    for t in np.flatnonzero((n_gt > 0) & (n_pred > 0)):  # dilation is only needed when both boundaries exist
        dil_gt = cv2.dilate(b_gt[t].view(np.uint8), kernel).view(bool)
        dil_pred = cv2.dilate(b_pred[t].view(np.uint8), kernel).view(bool)
        pred_matched[t] = np.count_nonzero(b_pred[t] & dil_gt)
        gt_matched[t] = np.count_nonzero(b_gt[t] & dil_pred)
    precision = np.where(n_pred == 0, 1.0, pred_matched / np.maximum(n_pred, 1))
    recall = np.where(n_gt == 0, 1.0, gt_matched / np.maximum(n_gt, 1))
    precision = np.where((n_gt == 0) & (n_pred > 0), 0.0, precision)
    recall = np.where((n_pred == 0) & (n_gt > 0), 0.0, recall)
    total = precision + recall
    f = np.where(total == 0, 0.0, 2 * precision * recall / np.where(total == 0, 1.0, total))
    return f[0] if squeeze else f


def decay_bins(n: int) -> list[tuple[int, int]]:
    """The 4 frame ranges [start, stop) of the decay statistic: edges round(linspace(1, n, 5)) - 1, stop inclusive.

    Ties round up (the official code adds 1e-10 before rounding); consecutive bins share their edge frame.
    The official code casts the edges to uint8, which wraps for n > 256; integers are used here instead.
    """
    edges = (np.round(np.linspace(1, n, DECAY_BINS + 1) + 1e-10) - 1).astype(np.int64)
    return [(int(edges[i]), int(edges[i + 1]) + 1) for i in range(DECAY_BINS)]


def statistics(values: np.ndarray) -> tuple[float, float, float]:
    """(Mean, Recall, Decay) of one object's per-frame scores (length N >= 1).

    Recall = fraction of frames scoring > 0.5; Decay = mean of the first bin minus mean of the last bin.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    bins = decay_bins(len(values))
    first, last = values[slice(*bins[0])], values[slice(*bins[-1])]
    return float(values.mean()), float((values > RECALL_THRESHOLD).mean()), float(first.mean() - last.mean())


def score_objects(gt_ids: np.ndarray, pred_ids: np.ndarray, n_objects: int) -> tuple[np.ndarray, np.ndarray]:
    """J and F of every object over the frames given.

    gt_ids, pred_ids: T x H x W integer id maps (0 = background). Objects are ids 1..n_objects.
    Returns (J, F), each n_objects x T.
    """
    if gt_ids.shape != pred_ids.shape:
        raise ValueError(f"ground truth {gt_ids.shape} and prediction {pred_ids.shape} differ in shape")
    j = np.zeros((n_objects, len(gt_ids)))
    f = np.zeros((n_objects, len(gt_ids)))
    for k in range(n_objects):
        gt, pred = gt_ids == k + 1, pred_ids == k + 1
        j[k] = region_similarity(gt, pred)
        f[k] = contour_accuracy(gt, pred)
    return j, f


def _as_bool_pair(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt).astype(bool, copy=False), np.asarray(pred).astype(bool, copy=False)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    return np.ascontiguousarray(gt), np.ascontiguousarray(pred)
