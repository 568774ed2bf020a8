"""LLaVA-style conversation JSON (LLaVA-Instruct-150K, ShareGPT4V, ALLaVA) -> shards.

All three ship a JSON list of ``{"id", "image": relative path, "conversations": [{"from":
"human"|"gpt", "value": ...}]}``; ALLaVA and some ShareGPT4V dumps use "user"/"assistant"
roles, which are mapped to human/gpt. Items without an image (text-only) are skipped and
counted; several conversations about one image become one sample with several chats.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from setokim.data.converters.common import Converted, Records, load_json, read_image, write_split
from setokim.data.schema import SampleAnnotation
from setokim.data.shards import safe_key

log = logging.getLogger("setokim.data.converters")
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def normalize_turns(turns: list[dict[str, Any]], item_id: str) -> list[dict[str, str]]:
    out = []
    for k, t in enumerate(turns):
        role = ROLES.get(str(t.get("from", t.get("role", ""))).lower())
        if role is None:
            raise ValueError(
                f"item {item_id!r} turn {k}: role must be one of {sorted(ROLES)}, got {t}"
            )
        out.append({"from": role, "value": str(t.get("value", t.get("content", "")))})
    return out


def iter_llava(
    json_path: str | Path,
    image_root: str | Path,
    source: str = "llava",
    records: Records | None = None,
) -> Iterator[Converted]:
    records = records or Records()
    items = load_json(json_path)
    if not isinstance(items, list):
        raise ValueError(f"{json_path}: expected a JSON list of conversations")
    by_image: dict[str, list[list[dict[str, str]]]] = defaultdict(list)
    skipped = 0
    for n, it in enumerate(items):
        item_id = str(it.get("id", n)) if isinstance(it, dict) else str(n)
        with records.record(json_path, f"id {item_id}"):
            if not isinstance(it, dict):
                raise TypeError(f"item must be a JSON object, got {type(it).__name__}")
            if not it.get("image"):
                skipped += 1
                continue
            if not isinstance(it["image"], str):
                raise TypeError(f"field 'image': expected str, got {it['image']!r:.60}")
            turns = it.get("conversations", it.get("conversation"))
            if not turns or not isinstance(turns, list):
                raise ValueError("field 'conversations': missing or not a non-empty list")
            by_image[it["image"]].append(normalize_turns(turns, item_id))
    if skipped:
        log.warning("%s: skipped %d items without an image", json_path, skipped)
    for rel in sorted(by_image):
        with records.record(json_path, f"image {rel}"):
            yield _sample(image_root, rel, source, by_image[rel])


def _sample(
    image_root: str | Path, rel: str, source: str, chats: list[list[dict[str, str]]]
) -> Converted:
    data, ext, w, h = read_image(Path(image_root) / rel)
    key = safe_key(f"{source}-{Path(rel).with_suffix('').as_posix()}")
    ann = SampleAnnotation(
        key=key,
        width=w,
        height=h,
        source=source,
        conversations=chats,
        meta={"image": rel},
    )
    return Converted(ann, data, ext)


def convert_llava(
    json_path: str | Path, image_root: str | Path, out_dir: str | Path, split: str, *,
    source: str = "llava", samples_per_shard: int = 1000, progress: bool = False,
    overwrite: bool = False, skip_bad: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Convert one conversation file (`source` names the variant: llava, sharegpt4v, allava)."""
    records = Records(skip_bad)
    it = iter_llava(json_path, image_root, source, records)
    return write_split(
        out_dir, split, it, source=source, samples_per_shard=samples_per_shard, progress=progress,
        overwrite=overwrite, records=records,
    )  # fmt: skip
