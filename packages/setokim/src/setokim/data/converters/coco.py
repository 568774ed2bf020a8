"""COCO captions + instances (the official annotation JSON files) -> shards.

Layout: ``captions_{split}2017.json`` and/or ``instances_{split}2017.json`` (``images``,
``annotations``, ``categories``) and an image folder with ``file_name`` of each image.
Objects carry the instance mask (polygons or RLE -> RLE), xyxy box and category name; an
object whose category is unique in its image also gets a REC item ("the dog").
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from setokim.data.converters.common import (
    Converted,
    Records,
    load_json,
    numbers,
    optional,
    read_image,
    require,
    write_split,
)
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
    """Objects of one image from its instance annotations (official schema: `bbox`,
    `segmentation` and a `category_id` of the file's `categories` are required; errors name
    the annotation id and the field)."""
    out = []
    for a in anns:
        where = f"annotation id {a.get('id')!r}" if isinstance(a, dict) else "annotation"
        try:
            x, y, w, h = numbers(require(a, "bbox", list), 4, "bbox")
            seg = require(a, "segmentation", (list, dict))
            cat = require(a, "category_id", int)
            area = optional(a, "area", (int, float))
            optional(a, "iscrowd", int)
            if cat not in cats:
                raise ValueError(
                    f"field 'category_id': {cat} is not in the file's categories "
                    f"({sorted(cats)[:10]}{'...' if len(cats) > 10 else ''})"
                )
            mask = encode_mask(coco_mask(seg, height, width))
        except KeyError as exc:
            raise ValueError(f"{where}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        name = cats[cat]
        out.append(
            ObjectAnn(
                bbox=[x, y, x + w, y + h],
                mask=mask,
                name=name,
                category=name,
                area=float(w * h if area is None else area),
            )
        )
    return out


def iter_coco(
    image_dir: str | Path,
    captions_json: str | Path | None,
    instances_json: str | Path | None,
    key_prefix: str = "coco",
    records: Records | None = None,
) -> Iterator[Converted]:
    records = records or Records()
    caps_d, inst_d = load_json(captions_json), load_json(instances_json)
    if caps_d is None and inst_d is None:
        raise ValueError("give captions_json and/or instances_json")
    images = read_images(caps_d, captions_json, records)
    captions: dict[int, list[str]] = defaultdict(list)
    for a in _list(caps_d, "annotations", captions_json):
        with records.record(captions_json, f"annotation id {_id(a)}"):
            caption = require(a, "caption", str)
            captions[require(a, "image_id", int)].append(caption.strip())
    inst_images, instances, cats = read_instances(inst_d, instances_json, records)
    images.update(inst_images)
    for image_id in sorted(images):
        im = images[image_id]
        with records.record(instances_json or captions_json, f"image id {image_id}"):
            yield _coco_sample(image_dir, im, image_id, instances, cats, captions, key_prefix)


def read_images(d: Any, path: str | Path | None, records: Records) -> dict[int, dict[str, Any]]:
    """image id -> image record of an official COCO-format file (`id`, `file_name`; `width`
    and `height` typed when present); bad records are named (or skipped) by `records`."""
    images: dict[int, dict[str, Any]] = {}
    for im in _list(d, "images", path):
        with records.record(path or "", f"images[id={_id(im)}]"):
            require(im, "file_name", str)
            for name in ("width", "height"):
                optional(im, name, int)
            images[require(im, "id", int)] = im
    return images


def read_instances(
    d: Any, path: str | Path | None, records: Records
) -> tuple[dict[int, dict[str, Any]], dict[int, list[dict[str, Any]]], dict[int, str]]:
    """(images, image id -> its instance annotations, category id -> name) of an official
    `instances_*.json`; each annotation's `id` and `image_id` and each category's `id` and
    `name` are checked here, the mask fields when its image is converted (`coco_objects`)."""
    images = read_images(d, path, records)
    instances: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for a in _list(d, "annotations", path):
        with records.record(path or "", f"annotation id {_id(a)}"):
            require(a, "id", int)
            instances[require(a, "image_id", int)].append(a)
    cats: dict[int, str] = {}
    for c in _list(d, "categories", path):
        with records.record(path or "", f"category id {_id(c)}"):
            cats[require(c, "id", int)] = require(c, "name", str)
    return images, instances, cats


def _id(record: Any) -> Any:
    return record.get("id") if isinstance(record, dict) else None


def _list(d: Any, name: str, path: str | Path | None) -> list[Any]:
    """A top-level list of an official annotation file (absent: none)."""
    if d is None:
        return []
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object with {name!r}, got {type(d).__name__}")
    value = d.get(name, [])
    if not isinstance(value, list):
        raise ValueError(f"{path}: field {name!r} must be a list, got {type(value).__name__}")
    return value


def _coco_sample(
    image_dir: str | Path,
    im: dict[str, Any],
    image_id: int,
    instances: dict[int, list[dict[str, Any]]],
    cats: dict[int, str],
    captions: dict[int, list[str]],
    key_prefix: str,
) -> Converted:
    data, ext, w, h = read_image(Path(image_dir) / im["file_name"])
    objects = coco_objects(sorted(instances[image_id], key=lambda a: a["id"]), cats, h, w)
    counts = defaultdict(int)
    for o in objects:
        counts[o.category] += 1
    rec = [
        RefItem(f"the {o.category}", i) for i, o in enumerate(objects) if counts[o.category] == 1
    ]
    ann = SampleAnnotation(
        key=f"{key_prefix}-{image_id:012d}", width=w, height=h, source="coco", objects=objects,
        captions=captions[image_id], t2i=captions[image_id][:1], rec=rec,
        meta={"image_id": image_id, "file_name": im["file_name"]},
    )  # fmt: skip
    return Converted(ann, data, ext)


def convert_coco(
    image_dir: str | Path,
    out_dir: str | Path,
    split: str,
    *,
    captions_json: str | Path | None = None,
    instances_json: str | Path | None = None,
    samples_per_shard: int = 1000,
    progress: bool = False,
    overwrite: bool = False,
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Convert one COCO split; returns the manifest."""
    records = Records(skip_bad)
    return write_split(
        out_dir, split, iter_coco(image_dir, captions_json, instances_json, records=records),
        source="coco", samples_per_shard=samples_per_shard, progress=progress,
        overwrite=overwrite, records=records,
    )  # fmt: skip
