"""Referring/reasoning segmentation: gIoU and cIoU as LISA defines them.

gIoU is the mean of per-mask IoU (a mask pair whose union is empty counts as 1: nothing to
find and nothing predicted); cIoU is cumulative intersection over cumulative union. LISA adds a
1e-5 / 1e-10 guard to denominators; here empty unions are handled exactly instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mask_intersection_union(
    pred_masks: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray]
) -> np.ndarray:
    """Per-item (intersection, union) pixel counts of binary masks; rows of shape (N, 2)."""
    if len(pred_masks) != len(gt_masks):
        raise ValueError(
            f"pred_masks ({len(pred_masks)}) and gt_masks ({len(gt_masks)}) differ in length"
        )
    rows = np.zeros((len(gt_masks), 2), dtype=np.float64)
    for i, (p, g) in enumerate(zip(pred_masks, gt_masks, strict=True)):
        p, g = np.asarray(p), np.asarray(g)
        if p.shape != g.shape:
            raise ValueError(f"pred_masks[{i}] has shape {p.shape}, gt_masks[{i}] has {g.shape}")
        pb, gb = p.astype(bool), g.astype(bool)
        rows[i] = (np.logical_and(pb, gb).sum(), np.logical_or(pb, gb).sum())
    return rows


def giou_from_states(states: np.ndarray) -> float:
    """Mean per-item IoU from (intersection, union) rows; an empty union scores 1."""
    s = np.asarray(states, dtype=np.float64).reshape(-1, 2)
    iou = np.where(s[:, 1] > 0, s[:, 0] / np.where(s[:, 1] > 0, s[:, 1], 1.0), 1.0)
    return float(iou.mean())


def ciou_from_states(states: np.ndarray) -> float:
    """Cumulative intersection / cumulative union (1 when every union is empty)."""
    s = np.asarray(states, dtype=np.float64).reshape(-1, 2)
    union = s[:, 1].sum()
    return float(s[:, 0].sum() / union) if union > 0 else 1.0


def giou_ciou(
    pred_masks: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray]
) -> tuple[float, float]:
    """(gIoU, cIoU) over paired binary masks."""
    states = mask_intersection_union(pred_masks, gt_masks)
    if len(states) == 0:
        raise ValueError("no masks to score")
    return giou_from_states(states), ciou_from_states(states)
