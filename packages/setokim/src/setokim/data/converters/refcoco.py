"""refCOCO / refCOCO+ / refCOCOg (``refs(unc).p`` pickle + ``instances.json``) -> shards.

refs: a pickled list of {ref_id, ann_id, image_id, split, category_id, sentences: [{sent}]};
instances.json: COCO format for the referred images (COCO train2014 images, found by the
``file_name`` of instances.json). One sample per image of the chosen refs split; objects are
all instances of the image; every sentence is a REC item pointing at its instance.
"""

from __future__ import annotations

import pickle
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from setokim.data.converters.coco import coco_objects
from setokim.data.converters.common import Converted, Records, load_json, read_image, write_split
from setokim.data.schema import RefItem, SampleAnnotation


def iter_refcoco(
    image_dir: str | Path,
    refs_pickle: str | Path,
    instances_json: str | Path,
    ref_split: str,
    dataset: str = "refcoco",
    records: Records | None = None,
) -> Iterator[Converted]:
    records = records or Records()
    with open(refs_pickle, "rb") as f:
        refs = pickle.load(f)  # noqa: S301 - the dataset's own file format
    inst = load_json(instances_json)
    images = {im["id"]: im for im in inst["images"]}
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    anns_by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for a in inst["annotations"]:
        anns_by_image[a["image_id"]].append(a)
    refs_by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in refs:
        if r["split"] == ref_split:
            refs_by_image[r["image_id"]].append(r)
    if not refs_by_image:
        found = sorted({r["split"] for r in refs})
        raise ValueError(f"ref_split {ref_split!r} has no refs (splits in file: {found})")
    for image_id in sorted(refs_by_image):
        with records.record(refs_pickle, f"image_id {image_id}"):
            yield _sample(image_dir, image_id, images, anns_by_image, refs_by_image, cats,
                          instances_json, dataset, ref_split)  # fmt: skip


def _sample(
    image_dir: str | Path, image_id: int, images: dict[int, Any],
    anns_by_image: dict[int, list[dict[str, Any]]], refs_by_image: dict[int, list[dict[str, Any]]],
    cats: dict[int, str], instances_json: str | Path, dataset: str, ref_split: str,
) -> Converted:  # fmt: skip
    if image_id not in images:
        raise ValueError(f"image_id {image_id} of the refs is not in {instances_json}")
    im = images[image_id]
    data, ext, w, h = read_image(Path(image_dir) / im["file_name"])
    anns = sorted(anns_by_image[image_id], key=lambda a: a["id"])
    index = {a["id"]: i for i, a in enumerate(anns)}
    rec = []
    for r in sorted(refs_by_image[image_id], key=lambda r: r["ref_id"]):
        if r["ann_id"] not in index:
            raise ValueError(f"ref {r['ref_id']}: ann_id {r['ann_id']} not in {instances_json}")
        rec.extend(RefItem(s["sent"], index[r["ann_id"]]) for s in r["sentences"])
    ann = SampleAnnotation(
        key=f"{dataset}-{image_id:012d}", width=w, height=h, source=dataset,
        objects=coco_objects(anns, cats, h, w), rec=rec, meta={"image_id": image_id, "ref_split": ref_split},
    )  # fmt: skip
    return Converted(ann, data, ext)


def convert_refcoco(
    image_dir: str | Path, out_dir: str | Path, split: str, *, refs_pickle: str | Path,
    instances_json: str | Path, ref_split: str | None = None, dataset: str = "refcoco",
    samples_per_shard: int = 1000, progress: bool = False, overwrite: bool = False,
    skip_bad: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Convert the refs of `ref_split` (default: `split`, e.g. train/val/testA/testB)."""
    records = Records(skip_bad)
    it = iter_refcoco(image_dir, refs_pickle, instances_json, ref_split or split, dataset, records)
    return write_split(
        out_dir, split, it, source=dataset, samples_per_shard=samples_per_shard, progress=progress,
        overwrite=overwrite, records=records,
    )  # fmt: skip
