"""Fixtures shared by the setokim tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from setokim.data.converters import convert_llava
from setokim.data.generate import generate_dataset
from setokim.data.shapes_world import World


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


def _write_mixed_sources(root: Path, train: int) -> Path:
    """Datasets of different kinds side by side: Shapes World root/sw0 and root/sw1 (seeds 0
    and 1; `train` + 2 val images at 32 px, 4 per shard) and LLaVA chat at root/llava."""
    for seed in (0, 1):
        generate_dataset(root / f"sw{seed}", train=train, val=2, test=0, image_size=32,
                         seed=seed, samples_per_shard=4, world=World(max_objects=3))  # fmt: skip
    _write_llava_shards(root, root / "raw")
    return root


@pytest.fixture(scope="session")
def mixed_sources() -> Callable[[Path, int], Path]:
    """`mixed_sources(root, train)`: two Shapes World datasets and a LLaVA one under root."""
    return _write_mixed_sources


@pytest.fixture(scope="module")
def ids(tok: Any) -> Any:
    """The packing ids (SpecialIds) of the test module's own `tok` fixture: [Img], [/Img],
    pad and bos. Imported here, not at the top, so data-only tests do not load the model."""
    from setokim.model.packing import SpecialIds
    from setokim.model.text_tokenizer import token_id

    return SpecialIds(
        token_id(tok, "[Img]"), token_id(tok, "[/Img]"), tok.pad_token_id, tok.bos_token_id
    )
