"""img2dataset webdataset output (CC3M, LAION, ...) -> shards, passed through.

img2dataset writes tars of ``{key}.jpg``, ``{key}.txt`` (caption) and ``{key}.json``
(url, key, status, width, height, ...). Image bytes are kept; the caption becomes a
caption and a text-to-image prompt; the original JSON is kept under ``meta``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from setokim.data.converters.common import Converted, Records, image_size, write_split
from setokim.data.schema import SampleAnnotation
from setokim.data.shards import iter_tar_groups, raw_sample, safe_key


def iter_img2dataset(
    tars: list[str | Path], source: str = "img2dataset", records: Records | None = None
) -> Iterator[Converted]:
    records = records or Records()
    if not tars:
        raise ValueError("tars must list at least one img2dataset .tar")
    for tar in tars:
        for tar_key, members in iter_tar_groups(tar):
            with records.record(tar, f"key {tar_key}"):
                yield _sample(tar, tar_key, members, source)


def _sample(
    tar: str | Path, tar_key: str, members: list[tuple[str, bytes]], source: str
) -> Converted:
    raw = raw_sample(tar_key, Path(tar).name, members)
    ext = next((e for e in ("jpg", "png", "webp") if e in raw), None)
    if ext is None:
        raise ValueError(f"{Path(tar).name} sample {raw['__key__']!r} has no image")
    caption = raw["txt"].decode("utf-8").strip() if "txt" in raw else ""
    meta = json.loads(raw["json"]) if "json" in raw else {}
    w, h = image_size(raw[ext])
    key = safe_key(f"{source}-{Path(tar).stem}-{raw['__key__']}")
    captions = [caption] if caption else []
    ann = SampleAnnotation(
        key=key,
        width=w,
        height=h,
        source=source,
        captions=captions,
        t2i=captions,
        meta=meta,
    )
    return Converted(ann, raw[ext], ext)


def convert_img2dataset(
    tars: list[str | Path], out_dir: str | Path, split: str, *, source: str = "img2dataset",
    samples_per_shard: int = 1000, progress: bool = False, overwrite: bool = False,
    skip_bad: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Pass img2dataset shards through to the common format."""
    records = Records(skip_bad)
    it = iter_img2dataset(sorted(tars), source, records)
    return write_split(
        out_dir, split, it, source=source, samples_per_shard=samples_per_shard, progress=progress,
        overwrite=overwrite, records=records,
    )  # fmt: skip
