"""Referring expression comprehension: box IoU and Acc@0.5 on xyxy pixel boxes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _as_boxes(boxes: Sequence[Sequence[float]] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4), got {arr.shape}")
    return arr


def xywh_to_xyxy(boxes: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """(x, y, w, h) -> (x1, y1, x2, y2), as in COCO/RefCOCO annotations."""
    b = _as_boxes(boxes, "boxes")
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def normalized_to_pixels(
    boxes: Sequence[Sequence[float]] | np.ndarray, width: float, height: float, scale: float = 1.0
) -> np.ndarray:
    """Normalised xyxy (in [0, scale], e.g. scale=1 or 1000 as many MLLMs emit) -> pixel xyxy."""
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    b = _as_boxes(boxes, "boxes") / float(scale)
    return b * np.array([width, height, width, height], dtype=np.float64)


def box_iou(pred_boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """Element-wise IoU of paired xyxy boxes; a degenerate or non-finite box has IoU 0."""
    p = _as_boxes(pred_boxes, "pred_boxes")
    g = _as_boxes(gt_boxes, "gt_boxes")
    if len(p) != len(g):
        raise ValueError(f"pred_boxes ({len(p)}) and gt_boxes ({len(g)}) differ in length")
    bad_g = ~np.isfinite(g).all(1) | (g[:, 2] <= g[:, 0]) | (g[:, 3] <= g[:, 1])
    if bad_g.any():
        raise ValueError(f"gt_boxes[{int(np.argmax(bad_g))}] is degenerate: {g[bad_g][0].tolist()}")
    valid = np.isfinite(p).all(1) & (p[:, 2] > p[:, 0]) & (p[:, 3] > p[:, 1])
    p = np.where(valid[:, None], p, 0.0)
    iw = np.clip(np.minimum(p[:, 2], g[:, 2]) - np.maximum(p[:, 0], g[:, 0]), 0, None)
    ih = np.clip(np.minimum(p[:, 3], g[:, 3]) - np.maximum(p[:, 1], g[:, 1]), 0, None)
    inter = iw * ih
    area_p = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
    area_g = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])
    iou = inter / (area_p + area_g - inter)
    return np.where(valid, iou, 0.0)


def rec_hits(
    pred_boxes: np.ndarray, gt_boxes: np.ndarray, iou_threshold: float = 0.5
) -> np.ndarray:
    """Per-item 0/1: IoU >= threshold."""
    return (box_iou(pred_boxes, gt_boxes) >= iou_threshold).astype(np.float64)


def rec_accuracy(
    pred_boxes: Sequence[Sequence[float]] | np.ndarray,
    gt_boxes: Sequence[Sequence[float]] | np.ndarray,
    iou_threshold: float = 0.5,
) -> float:
    """Share of predictions whose IoU with the ground truth is >= `iou_threshold` (Acc@0.5)."""
    hits = rec_hits(np.asarray(pred_boxes), np.asarray(gt_boxes), iou_threshold)
    if hits.size == 0:
        raise ValueError("no boxes to score")
    return float(hits.mean())
