"""LLaVA-style conversation JSON (LLaVA-Instruct-150K, ShareGPT4V, ALLaVA) -> shards.

All three ship a JSON list of ``{"id", "image": relative path, "conversations": [{"from":
"human"|"gpt", "value": ...}]}``; ALLaVA and some ShareGPT4V dumps use "user"/"assistant"
roles, which are mapped to human/gpt. Items without an image (text-only) are skipped and
counted; several conversations about one image become one sample with several chats.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from setokim.data.converters.common import Converted, read_image, write_split
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
    json_path: str | Path, image_root: str | Path, source: str = "llava"
) -> Iterator[Converted]:
    items = json.loads(Path(json_path).read_text())
    if not isinstance(items, list):
        raise ValueError(f"{json_path}: expected a JSON list of conversations")
    by_image: dict[str, list[list[dict[str, str]]]] = defaultdict(list)
    skipped = 0
    for n, it in enumerate(items):
        item_id = str(it.get("id", n))
        if not it.get("image"):
            skipped += 1
            continue
        turns = it.get("conversations", it.get("conversation"))
        if not turns:
            raise ValueError(f"{json_path}: item {item_id!r} has no conversations")
        by_image[it["image"]].append(normalize_turns(turns, item_id))
    if skipped:
        log.warning("%s: skipped %d items without an image", json_path, skipped)
    for rel in sorted(by_image):
        data, ext, w, h = read_image(Path(image_root) / rel)
        key = safe_key(f"{source}-{Path(rel).with_suffix('').as_posix()}")
        ann = SampleAnnotation(
            key=key,
            width=w,
            height=h,
            source=source,
            conversations=by_image[rel],
            meta={"image": rel},
        )
        yield Converted(ann, data, ext)


def convert_llava(
    json_path: str | Path, image_root: str | Path, out_dir: str | Path, split: str, *,
    source: str = "llava", samples_per_shard: int = 1000, progress: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Convert one conversation file (`source` names the variant: llava, sharegpt4v, allava)."""
    it = iter_llava(json_path, image_root, source)
    return write_split(
        out_dir, split, it, source=source, samples_per_shard=samples_per_shard, progress=progress
    )
