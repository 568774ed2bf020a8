"""refCOCO / refCOCO+ / refCOCOg (``refs(unc).p`` pickle + ``instances.json``) -> shards.

refs: a pickled list of {ref_id, ann_id, image_id, split, category_id, sentences: [{sent}]};
instances.json: COCO format for the referred images (COCO train2014 images, found by the
``file_name`` of instances.json). One sample per image of the chosen refs split; objects are
all instances of the image; every sentence is a REC item pointing at its instance. The refs
pickle is read with an unpickler that refuses classes and functions (no code runs); every ref
and instance record is checked field by field (a ref's ann_id must be an instance of its
image, with the same category_id).
"""

from __future__ import annotations

import pickle
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from setokim.data.converters.coco import coco_objects, read_instances
from setokim.data.converters.common import (
    Converted,
    RecordError,
    Records,
    load_json,
    optional,
    read_image,
    require,
    write_split,
)
from setokim.data.schema import RefItem, SampleAnnotation


class _PlainUnpickler(pickle.Unpickler):
    """The refs file is a pickle of lists, dicts, strings and numbers: anything that names a
    class or function (which could run code on load) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refers to {module}.{name}; a refs file holds only lists, dicts, strings, numbers"
        )


def load_refs(path: str | Path) -> list[Any]:
    """The refs list of `refs(unc).p` (no code runs); errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"refs file {str(p)!r} does not exist")
    try:
        with open(p, "rb") as f:
            refs = _PlainUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"refs file {str(p)!r} is not a refs pickle: {exc}") from None
    if not isinstance(refs, list):
        raise ValueError(
            f"refs file {str(p)!r}: expected a list of refs, got {type(refs).__name__}"
        )
    return refs


def check_ref(ref: Any) -> None:
    """One ref against the official schema: ref_id, ann_id, image_id, category_id (int),
    split (str), sentences (a non-empty list of {sent: str, ...})."""
    for name in ("ref_id", "ann_id", "image_id", "category_id"):
        require(ref, name, int)
    require(ref, "split", str)
    optional(ref, "file_name", str)
    sentences = require(ref, "sentences", list)
    if not sentences:
        raise ValueError("field 'sentences': empty (a ref has at least one expression)")
    for j, sent in enumerate(sentences):
        prefix = f"sentences[{j}]."
        require(sent, "sent", str, prefix=prefix)
        optional(sent, "sent_id", int, prefix=prefix)
        optional(sent, "raw", str, prefix=prefix)
        optional(sent, "tokens", list, prefix=prefix)


def iter_refcoco(
    image_dir: str | Path,
    refs_pickle: str | Path,
    instances_json: str | Path,
    ref_split: str,
    dataset: str = "refcoco",
    records: Records | None = None,
) -> Iterator[Converted]:
    """Every ref and instance record is checked field by field; a bad one is named (file,
    record id, field) or, with `records.skip_bad`, counted and skipped."""
    records = records or Records()
    refs = load_refs(refs_pickle)
    images, anns_by_image, cats = read_instances(load_json(instances_json), instances_json, records)
    refs_by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    found: set[str] = set()
    for i, r in enumerate(refs):
        rid = r.get("ref_id", f"#{i}") if isinstance(r, dict) else f"#{i}"
        with records.record(refs_pickle, f"ref_id {rid}"):
            check_ref(r)
            found.add(r["split"])
            if r["split"] == ref_split:
                refs_by_image[r["image_id"]].append(r)
    if not refs_by_image:
        raise ValueError(f"ref_split {ref_split!r} has no refs (splits in file: {sorted(found)})")
    for image_id in sorted(refs_by_image):
        with records.record(refs_pickle, f"image_id {image_id}"):
            yield _sample(image_dir, image_id, images, anns_by_image, refs_by_image, cats,
                          refs_pickle, instances_json, dataset, ref_split)  # fmt: skip


def _sample(
    image_dir: str | Path, image_id: int, images: dict[int, Any],
    anns_by_image: dict[int, list[dict[str, Any]]], refs_by_image: dict[int, list[dict[str, Any]]],
    cats: dict[int, str], refs_pickle: str | Path, instances_json: str | Path, dataset: str,
    ref_split: str,
) -> Converted:  # fmt: skip
    if image_id not in images:
        raise ValueError(f"field 'image_id': {image_id} of the refs is not in {instances_json}")
    im = images[image_id]
    data, ext, w, h = read_image(Path(image_dir) / im["file_name"])
    anns = sorted(anns_by_image[image_id], key=lambda a: a["id"])
    index = {a["id"]: i for i, a in enumerate(anns)}
    try:
        objects = coco_objects(anns, cats, h, w)
    except ValueError as exc:  # an instance record: name instances.json, not the refs
        raise RecordError(instances_json, f"image_id {image_id}", str(exc)) from None
    rec = []
    for r in sorted(refs_by_image[image_id], key=lambda r: r["ref_id"]):
        where = f"ref_id {r['ref_id']}"
        if r["ann_id"] not in index:
            raise RecordError(refs_pickle, where,
                              f"field 'ann_id': {r['ann_id']} is not an annotation of image "
                              f"{image_id} in {instances_json}")  # fmt: skip
        ann = anns[index[r["ann_id"]]]
        if ann["category_id"] != r["category_id"]:
            raise RecordError(refs_pickle, where,
                              f"field 'category_id': {r['category_id']}, but annotation "
                              f"{r['ann_id']} in {instances_json} has {ann['category_id']}")  # fmt: skip
        rec.extend(RefItem(s["sent"], index[r["ann_id"]]) for s in r["sentences"])
    ann = SampleAnnotation(
        key=f"{dataset}-{image_id:012d}", width=w, height=h, source=dataset,
        objects=objects, rec=rec, meta={"image_id": image_id, "ref_split": ref_split},
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
