"""Tokenizer metrics: tokens per image, and cluster maps scored against object masks
(adjusted Rand index, mean best overlap, Hungarian-matched mIoU)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy.optimize import linear_sum_assignment


def tokens_per_image_stats(counts: Sequence[int], max_bins: int = 64) -> dict:
    """Mean, std, min, max and an integer-binned histogram of visual tokens per image."""
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size == 0:
        raise ValueError("counts must be a non-empty 1-D sequence")
    if (c < 0).any() or (c != np.round(c)).any():
        raise ValueError("counts must be non-negative integers")
    lo, hi = int(c.min()), int(c.max())
    width = max(1, int(np.ceil((hi - lo + 1) / max_bins)))
    edges = np.arange(lo, hi + width + 1, width)
    hist, _ = np.histogram(c, bins=edges)
    return {
        "mean": float(c.mean()),
        "std": float(c.std()),
        "min": lo,
        "max": hi,
        "hist_edges": edges.tolist(),
        "hist_counts": hist.tolist(),
    }


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer label map (e.g. a patch-grid cluster map)."""
    lab = np.asarray(labels)
    if lab.shape == tuple(shape):
        return lab.astype(np.int64)
    img = Image.fromarray(lab.astype(np.int32), mode="I")
    return np.asarray(img.resize((shape[1], shape[0]), Image.NEAREST)).astype(np.int64)


def _flat_pair(
    pred: np.ndarray, gt: np.ndarray, ignore_label: int | None
) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred), np.asarray(gt)
    if p.shape != g.shape:
        raise ValueError(f"cluster map shape {p.shape} differs from mask shape {g.shape}")
    p, g = p.reshape(-1).astype(np.int64), g.reshape(-1).astype(np.int64)
    if ignore_label is not None:
        keep = g != ignore_label
        p, g = p[keep], g[keep]
    return p, g


def _pairs(x: np.ndarray) -> float:
    return float((x * (x - 1) / 2.0).sum())


def adjusted_rand_index(pred: np.ndarray, gt: np.ndarray, ignore_label: int | None = None) -> float:
    """ARI between a cluster map and an object label map (pixels labelled `ignore_label` in the
    ground truth are left out, e.g. background for FG-ARI). Identical partitions score 1."""
    p, g = _flat_pair(pred, gt, ignore_label)
    n = p.size
    if n < 2:
        return 1.0
    _, pi = np.unique(p, return_inverse=True)
    _, gi = np.unique(g, return_inverse=True)
    table = np.zeros((gi.max() + 1, pi.max() + 1))
    np.add.at(table, (gi, pi), 1)
    index = _pairs(table)
    sum_a, sum_b = _pairs(table.sum(1)), _pairs(table.sum(0))
    expected = sum_a * sum_b / (n * (n - 1) / 2.0)
    maximum = (sum_a + sum_b) / 2.0
    if maximum == expected:
        return 1.0
    return float((index - expected) / (maximum - expected))


def _iou_matrix(pred: np.ndarray, gt: np.ndarray, ignore_label: int | None) -> np.ndarray:
    """IoU of every ground-truth segment (rows) with every cluster (columns)."""
    p, g = _flat_pair(pred, gt, ignore_label)
    _, pi = np.unique(p, return_inverse=True)
    _, gi = np.unique(g, return_inverse=True)
    if p.size == 0:
        return np.zeros((0, 0))
    inter = np.zeros((gi.max() + 1, pi.max() + 1))
    np.add.at(inter, (gi, pi), 1)
    union = inter.sum(1, keepdims=True) + inter.sum(0, keepdims=True) - inter
    return inter / union


def mean_best_overlap(pred: np.ndarray, gt: np.ndarray, ignore_label: int | None = None) -> float:
    """mBO: each object's best IoU with any cluster, averaged over objects."""
    iou = _iou_matrix(pred, gt, ignore_label)
    if iou.shape[0] == 0:
        raise ValueError("the mask has no object pixels to score")
    return float(iou.max(axis=1).mean())


def hungarian_miou(pred: np.ndarray, gt: np.ndarray, ignore_label: int | None = None) -> float:
    """One-to-one matching of objects to clusters maximising IoU; mean over objects
    (an object left without a cluster scores 0)."""
    iou = _iou_matrix(pred, gt, ignore_label)
    if iou.shape[0] == 0:
        raise ValueError("the mask has no object pixels to score")
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].sum() / iou.shape[0])
