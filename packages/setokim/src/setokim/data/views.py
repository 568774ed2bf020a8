"""Task views: which items a decoded sample offers to each task, as flat dicts.

An item is what one batch row holds. Without `expand` a view picks one item per sample
(seeded by seed, epoch and key, so a resumed run picks the same); with `expand` it yields
all of them, keyed ``key#j``.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from setokim.data.decode import Decoded
from setokim.data.schema import IMAGE_VIEW, VIEWS


def _item(d: Decoded, key: str) -> dict[str, Any]:
    return {
        "key": key,
        "pixels": d.pixels,
        "object_masks": d.object_masks,
        "boxes": d.boxes,
        "object_names": [o.name or o.category for o in d.ann.objects],
    }


def _target(d: Decoded, index: int) -> dict[str, Any]:
    if not 0 <= index < len(d.ann.objects):
        raise ValueError(
            f"sample {d.key!r}: object_index {index} out of range ({len(d.ann.objects)} objects)"
        )
    return {
        "target_index": index,
        "target_boxes": d.boxes[index],
        "target_masks": d.object_masks[index],
    }


def task_fields(d: Decoded, task: str, j: int) -> dict[str, Any]:
    """The task-specific fields of item j of sample `d` (see schema.BATCH_FIELDS)."""
    a = d.ann
    if task == IMAGE_VIEW:
        return {}
    if task == "caption":
        return {"captions": a.captions[j]}
    if task == "t2i":
        return {"captions": a.t2i[j]}
    if task == "vqa":
        q = a.vqa[j]
        return {
            "questions": q.question,
            "answers": q.answer,
            "answer_lists": list(q.answers),
            "question_types": q.qtype,
        }
    if task == "pope":
        p = a.pope[j]
        return {"questions": p.question, "answers": p.answer, "pope_splits": p.split}
    if task == "rec":
        r = a.rec[j]
        return {"expressions": r.text, **_target(d, r.object_index)}
    if task == "reasonseg":
        r = a.reasonseg[j]
        return {"queries": r.text, "answers": r.answer, **_target(d, r.object_index)}
    if task == "edit":
        if d.target_pixels is None:
            raise ValueError(f"sample {d.key!r} has an edit but no target image")
        e = a.edit[j]
        return {"instructions": e.instruction, "edit_ops": e.op, "target_pixels": d.target_pixels}
    if task == "chat":
        return {"conversations": [dict(t) for t in a.conversations[j]]}
    raise ValueError(f"task must be one of {VIEWS}, got {task!r}")


def items_for(
    d: Decoded, task: str, *, seed: int, epoch: int, expand: bool
) -> list[dict[str, Any]]:
    """Items of sample `d` for `task`: one seeded choice, or all with `expand`."""
    n = d.ann.num_items(task)
    if n == 0:
        return []
    if expand:
        return [{**_item(d, f"{d.key}#{j}"), **task_fields(d, task, j)} for j in range(n)]
    rng = np.random.default_rng([seed, epoch, zlib.crc32(d.key.encode())])
    j = int(rng.integers(n))
    return [{**_item(d, d.key), **task_fields(d, task, j)}]
