"""Fixtures shared by the setokim tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from setokim.data.converters import convert_llava


def _write_llava_shards(root: Path, raw: Path, n: int = 3) -> Path:
    """A LLaVA-format conversation file of `n` noise JPEGs converted to shards at root/llava."""
    items = []
    for i in range(n):
        path = raw / "coco" / f"{i:012d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 255, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, format="JPEG")
        items.append({"id": str(i), "image": f"coco/{path.name}", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": f"Noise number {i}."}]})  # fmt: skip
    (raw / "chat.json").write_text(json.dumps(items))
    convert_llava(raw / "chat.json", raw, root / "llava", "train", source="llava",
                  samples_per_shard=2)  # fmt: skip
    return root / "llava"


@pytest.fixture(scope="session")
def llava_shards() -> Callable[[Path, Path], Path]:
    """`llava_shards(root, raw_dir)` writes a tiny converted LLaVA dataset to root/llava."""
    return _write_llava_shards
