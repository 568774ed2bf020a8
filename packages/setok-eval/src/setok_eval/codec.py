"""JSON-friendly run-length encoding of masks and integer label maps (cluster maps), so that
mask and token predictions fit on one line of the prediction cache."""

from __future__ import annotations

from typing import Any

import numpy as np


def encode_labels(labels: np.ndarray) -> dict[str, Any]:
    """Row-major runs of an integer (or boolean) 2-D map: {"shape", "values", "runs"}."""
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {arr.shape}")
    flat = arr.reshape(-1).astype(np.int64)
    if flat.size == 0:
        return {"shape": list(arr.shape), "values": [], "runs": []}
    change = np.flatnonzero(np.diff(flat)) + 1
    starts = np.concatenate([[0], change])
    runs = np.diff(np.concatenate([starts, [flat.size]]))
    return {"shape": list(arr.shape), "values": flat[starts].tolist(), "runs": runs.tolist()}


def decode_labels(obj: dict[str, Any]) -> np.ndarray:
    """Inverse of `encode_labels` (int64 array)."""
    try:
        shape, values, runs = tuple(obj["shape"]), obj["values"], obj["runs"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not an encoded label map: {str(obj)[:80]}") from exc
    flat = np.repeat(np.asarray(values, dtype=np.int64), np.asarray(runs, dtype=np.int64))
    if flat.size != int(np.prod(shape)):
        raise ValueError(
            f"encoded runs cover {flat.size} pixels, shape {shape} needs {np.prod(shape)}"
        )
    return flat.reshape(shape)
