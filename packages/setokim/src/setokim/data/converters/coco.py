"""COCO captions + instances (the official annotation JSON files) -> shards.

Layout: ``captions_{split}2017.json`` and/or ``instances_{split}2017.json`` (``images``,
``annotations``, ``categories``) and an image folder with ``file_name`` of each image.
Objects carry the instance mask (polygons or RLE -> RLE), xyxy box and category name; an
object whose category is unique in its image also gets a REC item ("the dog").
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from setokim.data.converters.common import Converted, read_image, write_split
from setokim.data.rle import decode_mask, encode_mask, polygons_to_mask
from setokim.data.schema import ObjectAnn, RefItem, SampleAnnotation


def coco_mask(seg: Any, height: int, width: int) -> np.ndarray:
    """A COCO `segmentation` (polygon list, RLE with list or str counts) -> (H, W) bool."""
    if isinstance(seg, list):
        return polygons_to_mask(seg, height, width)
    if isinstance(seg, dict):
        return decode_mask(seg)
    raise ValueError(
        f"segmentation must be a polygon list or an RLE dict, got {type(seg).__name__}"
    )


def coco_objects(
    anns: list[dict[str, Any]], cats: dict[int, str], height: int, width: int
) -> list[ObjectAnn]:
    out = []
    for a in anns:
        x, y, w, h = a["bbox"]
        mask = (
            encode_mask(coco_mask(a["segmentation"], height, width))
            if "segmentation" in a
            else None
        )
        name = cats.get(a["category_id"], str(a["category_id"]))
        out.append(
            ObjectAnn(
                bbox=[x, y, x + w, y + h],
                mask=mask,
                name=name,
                category=name,
                area=float(a.get("area", w * h)),
            )
        )
    return out


def load_json(path: str | Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"annotation file {str(p)!r} does not exist")
    return json.loads(p.read_text())


def iter_coco(
    image_dir: str | Path,
    captions_json: str | Path | None,
    instances_json: str | Path | None,
    key_prefix: str = "coco",
) -> Iterator[Converted]:
    caps_d, inst_d = load_json(captions_json), load_json(instances_json)
    if caps_d is None and inst_d is None:
        raise ValueError("give captions_json and/or instances_json")
    images: dict[int, dict[str, Any]] = {}
    for d in (caps_d, inst_d):
        for im in (d or {}).get("images", []):
            images[im["id"]] = im
    captions: dict[int, list[str]] = defaultdict(list)
    for a in (caps_d or {}).get("annotations", []):
        captions[a["image_id"]].append(a["caption"].strip())
    instances: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for a in (inst_d or {}).get("annotations", []):
        instances[a["image_id"]].append(a)
    cats = {c["id"]: c["name"] for c in (inst_d or {}).get("categories", [])}
    for image_id in sorted(images):
        im = images[image_id]
        data, ext, w, h = read_image(Path(image_dir) / im["file_name"])
        objects = coco_objects(sorted(instances[image_id], key=lambda a: a["id"]), cats, h, w)
        counts = defaultdict(int)
        for o in objects:
            counts[o.category] += 1
        rec = [
            RefItem(f"the {o.category}", i)
            for i, o in enumerate(objects)
            if counts[o.category] == 1
        ]
        ann = SampleAnnotation(
            key=f"{key_prefix}-{image_id:012d}", width=w, height=h, source="coco", objects=objects,
            captions=captions[image_id], t2i=captions[image_id][:1], rec=rec,
            meta={"image_id": image_id, "file_name": im["file_name"]},
        )  # fmt: skip
        yield Converted(ann, data, ext)


def convert_coco(
    image_dir: str | Path,
    out_dir: str | Path,
    split: str,
    *,
    captions_json: str | Path | None = None,
    instances_json: str | Path | None = None,
    samples_per_shard: int = 1000,
    progress: bool = False,
) -> dict[str, Any]:
    """Convert one COCO split; returns the manifest."""
    return write_split(
        out_dir, split, iter_coco(image_dir, captions_json, instances_json),
        source="coco", samples_per_shard=samples_per_shard, progress=progress,
    )  # fmt: skip
