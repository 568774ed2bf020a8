"""Shared writer for converters: real datasets -> the same shards + manifest as Shapes World."""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from setokim.data.schema import SampleAnnotation
from setokim.data.shard_index import index_name
from setokim.data.shards import (
    MANIFEST_NAME,
    ShardInfo,
    ShardWriter,
    read_manifest,
    write_manifest,
)

log = logging.getLogger("setokim.data.converters")


@dataclass
class Converted:
    """One output sample: the original image bytes (not re-encoded) and its annotation."""

    ann: SampleAnnotation
    image: bytes
    image_ext: str = "jpg"
    target: bytes | None = None
    target_ext: str = "jpg"


def image_ext(path: str | Path) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in ("jpg", "jpeg", "png", "webp"):
        raise ValueError(f"image {str(path)!r}: extension must be jpg/jpeg/png/webp")
    return "jpg" if ext == "jpeg" else ext


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header only."""
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def read_image(path: str | Path) -> tuple[bytes, str, int, int]:
    """(bytes, ext, width, height) of an image file; FileNotFoundError names the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file {str(p)!r} does not exist")
    data = p.read_bytes()
    w, h = image_size(data)
    return data, image_ext(p), w, h


def write_split(
    out_dir: str | Path,
    split: str,
    samples: Iterable[Converted],
    *,
    source: str,
    samples_per_shard: int = 1000,
    progress: bool = False,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `samples` as `{split}-NNNNNN.tar` and add the split to manifest.json.

    The shards are written into a hidden staging folder inside `out_dir` and moved into
    place only once every sample converted, so a conversion that fails half-way leaves an
    earlier conversion of the split (shards and manifest) as it was. Shards of the earlier
    conversion that the new one does not have are removed after the manifest is written.
    """
    if progress:
        from tqdm import tqdm

        samples = tqdm(samples, desc=f"{source}/{split}", unit="img")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=f".{split}.staging-"))
    try:
        writer = ShardWriter(staging, split, samples_per_shard)
        for s in samples:
            files = {s.image_ext: s.image, "json": s.ann.to_json()}
            if s.target is not None:
                files[f"target.{s.target_ext}"] = s.target
            writer.write(s.ann.key, files)
        shards = writer.close()
        previous = read_manifest(out) if (out / MANIFEST_NAME).is_file() else None
        for shard in shards:
            for name in (shard.name, index_name(shard.name)):
                if (staging / name).exists():
                    os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    splits = {}
    if previous is not None:
        splits = {
            k: [ShardInfo(**s) for s in v["shards"]]
            for k, v in previous["splits"].items()
            if k != split
        }
    splits[split] = shards
    merged = dict(previous["info"]) if previous else {}
    merged.update({"source": source, **(info or {})})
    manifest = write_manifest(out, splits, merged)
    if previous is not None and split in previous["splits"]:
        kept = {s.name for s in shards}
        for old in previous["splits"][split]["shards"]:
            if old["name"] not in kept:
                (out / old["name"]).unlink(missing_ok=True)
                (out / index_name(old["name"])).unlink(missing_ok=True)
    return manifest
