"""img2dataset webdataset output (CC3M, LAION, ...) -> shards, passed through.

img2dataset writes tars of ``{key}.jpg``, ``{key}.txt`` (caption) and ``{key}.json``
(url, key, status, width, height, ...). Image bytes are kept; the caption becomes a
caption and a text-to-image prompt; the original JSON is kept under ``meta``. Each sample is
checked against img2dataset's schema (`check_meta`: the JSON's fields and types, a
"success" status, its key and size matching the tar member and the image, UTF-8 text); a bad
one names the tar, the sample key and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from setokim.data.converters.common import (
    Converted,
    Records,
    image_size,
    optional,
    require,
    write_split,
)
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


_OPTIONAL_META: dict[str, type | tuple[type, ...]] = {
    "caption": (str, type(None)),
    "error_message": (str, type(None)),
    "original_width": (int, type(None)),
    "original_height": (int, type(None)),
    "sha256": (str, type(None)),
    "exif": (str, dict, type(None)),
}


def check_meta(meta: Any, key: str, width: int, height: int) -> dict[str, Any]:
    """A sample's ``.json`` against img2dataset's writer: url, key, status (str; "success",
    the only status written to a tar), width and height (int, the stored image's size) and
    the typed optional fields; `key` is the tar member's."""
    for name in ("url", "key", "status"):
        require(meta, name, str)
    if meta["key"] != key:
        raise ValueError(f"field 'key': {meta['key']!r}, but the tar member is {key!r}")
    if meta["status"] != "success":
        raise ValueError(f"field 'status': {meta['status']!r} (only 'success' samples are kept)")
    for name, size in (("width", width), ("height", height)):
        value = optional(meta, name, (int, type(None)))
        if value is not None and value != size:
            raise ValueError(f"field {name!r}: {value}, but the image is {width}x{height}")
    for name, kind in _OPTIONAL_META.items():
        optional(meta, name, kind)
    return meta


def _sample(
    tar: str | Path, tar_key: str, members: list[tuple[str, bytes]], source: str
) -> Converted:
    raw = raw_sample(tar_key, Path(tar).name, members)
    ext = next((e for e in ("jpg", "png", "webp") if e in raw), None)
    if ext is None:
        raise ValueError(f"{Path(tar).name} sample {raw['__key__']!r} has no image")
    try:
        caption = raw["txt"].decode("utf-8").strip() if "txt" in raw else ""
    except UnicodeDecodeError as exc:
        raise ValueError(f"field 'txt': not UTF-8 text ({exc})") from None
    w, h = image_size(raw[ext])
    meta: dict[str, Any] = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"field 'json': not valid JSON ({exc})") from None
        check_meta(meta, Path(str(raw["__key__"])).name, w, h)
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
