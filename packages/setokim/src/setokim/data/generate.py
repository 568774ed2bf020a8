"""Shapes World datasets: one image with all task annotations per sample, written to shards.

Every image depends only on (seed, split, index), so generation order and worker count never
change the bytes. POPE "popular" negatives need split-level object frequencies, so scenes of
a split are sampled first (cheap), then rendered and annotated.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from setokim.data import annotate as ann
from setokim.data.edits import sample_edit
from setokim.data.rle import bbox_of, encode_mask
from setokim.data.schema import EditItem, ObjectAnn, SampleAnnotation
from setokim.data.shapes_world import GENERATOR_VERSION, SHAPES, Scene, World, render, sample_scene
from setokim.data.shards import MANIFEST_NAME, ShardInfo, ShardWriter, write_manifest
from setokim.utils.io import write_dir_atomically

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> PNG bytes (lossless, deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def object_anns(scene: Scene, masks: np.ndarray, size: int) -> list[ObjectAnn]:
    return [
        ObjectAnn(
            bbox=bbox_of(m),
            mask=encode_mask(m),
            name=o.name,
            category=o.shape,
            color=o.color,
            size=o.size,
            center=[o.cx * size, o.cy * size],
            corners=SHAPES[o.shape],
            z=z,
            area=float(m.sum()),
        )
        for z, (o, m) in enumerate(zip(scene.objects, masks, strict=True))
    ]


@dataclass
class ShapesWorld:
    """The generator: `scene(split, i)` and `sample(split, i, popular)` are pure functions."""

    seed: int = 0
    image_size: int = 64
    world: World = field(default_factory=World)

    def _rng(self, split: str, index: int, stream: int) -> np.random.Generator:
        if split not in SPLIT_IDS:
            raise ValueError(f"split must be one of {list(SPLIT_IDS)}, got {split!r}")
        return np.random.default_rng([self.seed, SPLIT_IDS[split], index, stream])

    def scene(self, split: str, index: int) -> Scene:
        return sample_scene(self._rng(split, index, 0), self.world)

    def popular(self, scenes: list[Scene]) -> list[tuple[str, str]]:
        """(colour, shape) pairs of a split, most frequent first (ties by name)."""
        counts = Counter((o.color, o.shape) for s in scenes for o in s.objects)
        return sorted(counts, key=lambda k: (-counts[k], k))

    def sample(
        self, split: str, index: int, popular: list[tuple[str, str]], scene: Scene | None = None
    ) -> tuple[SampleAnnotation, dict[str, bytes]]:
        """Render and annotate one image: (annotation, files for the shard)."""
        scene = scene if scene is not None else self.scene(split, index)
        size = self.image_size
        key = f"{split}-{index:08d}"
        pixels, masks = render(scene, size)
        rng = self._rng(split, index, 1)
        caps = ann.captions(scene, rng)
        vqa = ann.vqa(scene, rng, self.world)
        sample = SampleAnnotation(
            key=key,
            width=size,
            height=size,
            source="shapes_world",
            objects=object_anns(scene, masks, size),
            captions=caps,
            vqa=vqa,
            pope=ann.pope(scene, rng, popular, self.world.shapes),
            rec=ann.referring(scene, rng),
            reasonseg=ann.reasoning(scene, rng),
            t2i=[caps[2]],
            conversations=[ann.conversation(caps[2], vqa, rng)],
            meta={
                "background": scene.background,
                "textured": scene.textured,
                "generator": GENERATOR_VERSION,
            },
        )
        files = {"png": encode_png(pixels)}
        edit = sample_edit(scene, self._rng(split, index, 2), self.world)
        if edit is not None:
            target, instruction, op = edit
            tpix, tmasks = render(target, size)
            sample.edit = [EditItem(instruction, op, object_anns(target, tmasks, size))]
            files["target.png"] = encode_png(tpix)
        files["json"] = sample.to_json()
        return sample, files

    def iter_split(
        self, split: str, count: int
    ) -> Iterator[tuple[SampleAnnotation, dict[str, bytes]]]:
        scenes = [self.scene(split, i) for i in range(count)]
        popular = self.popular(scenes)
        for i, scene in enumerate(scenes):
            yield self.sample(split, i, popular, scene)


def generate_dataset(
    out_dir: str | Path,
    train: int = 1000,
    val: int = 100,
    test: int = 100,
    image_size: int = 64,
    seed: int = 0,
    *,
    samples_per_shard: int = 1000,
    world: World | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write Shapes World shards, manifest.json, dataset_card.json and README.md to `out_dir`.

    Returns the manifest. Same arguments -> byte-identical shards. A non-empty `out_dir` (a
    dataset, converted data, anything) is refused unless `overwrite`; the new dataset is
    written beside it and replaces the whole folder only once complete.
    """

    for name, n in (("train", train), ("val", val), ("test", test)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    generator = ShapesWorld(seed=seed, image_size=image_size, world=world or World())
    target = Path(out_dir)
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        what = "a dataset" if (target / MANIFEST_NAME).is_file() else "files"
        raise FileExistsError(
            f"out_dir {str(target)!r} already holds {what}; pass --overwrite (overwrite=True) "
            "to replace the whole folder"
        )
    result: dict[str, Any] = {}

    def fill(out: Path) -> None:
        result["manifest"] = _write_world(
            generator, out, train, val, test, samples_per_shard, progress
        )

    write_dir_atomically(target, fill)
    return result["manifest"]


def _write_world(
    generator: ShapesWorld,
    out: Path,
    train: int,
    val: int,
    test: int,
    samples_per_shard: int,
    progress: bool,
) -> dict[str, Any]:
    from setokim.data.card import build_card, write_card

    seed, image_size = generator.seed, generator.image_size
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=train + val + test, desc="shapes world", unit="img")
    splits: dict[str, list[ShardInfo]] = {}
    samples: dict[str, list[SampleAnnotation]] = {}
    for split, count in (("train", train), ("val", val), ("test", test)):
        writer = ShardWriter(out, split, samples_per_shard)
        samples[split] = []
        for sample, files in generator.iter_split(split, count):
            writer.write(sample.key, files)
            samples[split].append(sample)
            if bar is not None:
                bar.update(1)
        splits[split] = writer.close()
    if bar is not None:
        bar.close()
    info = {
        "source": "shapes_world",
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "max_objects": generator.world.max_objects,
        "world": generator.world.as_dict(),
        "samples_per_shard": samples_per_shard,
    }
    manifest = write_manifest(out, splits, info)
    write_card(out, build_card(samples, info | {"version": manifest["version"]}))
    return manifest
