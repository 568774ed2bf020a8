"""Masks as pycocotools RLE with str counts, so they fit in the sample JSON."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool -> {"size": [H, W], "counts": str}."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_mask(rle: dict[str, Any]) -> np.ndarray:
    """RLE (compressed str/bytes counts or uncompressed list counts) -> (H, W) bool."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, list):
        obj = mask_utils.frPyObjects(rle, h, w)
    else:
        obj = {
            "size": [h, w],
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
        }
    with warnings.catch_warnings():  # pycocotools 2.0.x: np.array(copy=False) warns on numpy 2
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(obj).astype(bool)


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """COCO polygon segmentation -> (H, W) bool."""
    rles = mask_utils.frPyObjects(polygons, height, width)
    return decode_mask(mask_utils.merge(rles))


def bbox_of(mask: np.ndarray) -> list[float]:
    """xyxy box (x1, y1 exclusive) of a mask; zeros for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
