"""Collate task-view items into padded tensors (layout: schema.py)."""

from __future__ import annotations

from typing import Any

import torch

from setokim.data.schema import BATCH_FIELDS

_STACKED = {"target_boxes", "target_masks", "target_pixels"}


def collate(items: list[dict[str, Any]], task: str) -> dict[str, Any]:
    """Pad objects to the batch maximum O (at least 1) and stack; texts stay lists."""
    if not items:
        raise ValueError("items must not be empty")
    if task not in BATCH_FIELDS:
        raise ValueError(f"task must be one of {list(BATCH_FIELDS)}, got {task!r}")
    shape = items[0]["pixels"].shape
    for b, it in enumerate(items):
        if it["pixels"].shape != shape:
            raise ValueError(
                f"pixels of batch index {b} ({it['key']!r}) are {tuple(it['pixels'].shape)}, "
                f"batch index 0 is {tuple(shape)}: set image_size to resize"
            )
    bsz, (_, h, w) = len(items), shape
    n_obj = max(1, max(it["object_masks"].shape[0] for it in items))
    masks = torch.zeros(bsz, n_obj, h, w, dtype=torch.bool)
    valid = torch.zeros(bsz, n_obj, dtype=torch.bool)
    boxes = torch.zeros(bsz, n_obj, 4, dtype=torch.float32)
    for b, it in enumerate(items):
        o = it["object_masks"].shape[0]
        masks[b, :o] = it["object_masks"]
        valid[b, :o] = True
        boxes[b, :o] = it["boxes"]
    batch: dict[str, Any] = {
        "task": task,
        "key": [it["key"] for it in items],
        "pixels": torch.stack([it["pixels"] for it in items]),
        "object_masks": masks,
        "object_valid": valid,
        "boxes": boxes,
        "object_names": [it["object_names"] for it in items],
    }
    for name in BATCH_FIELDS[task]:
        values = [it[name] for it in items]
        if name in _STACKED:
            batch[name] = torch.stack(values)
        elif name == "target_index":
            batch[name] = torch.tensor(values, dtype=torch.int64)
        else:
            batch[name] = values
    return batch
