"""Shards (Shapes World or any converted dataset) -> the eval suite's task documents.

Layout written under ``out_root`` (paths inside documents are relative to ``data/eval``)::

    data/eval/{name}.jsonl                one per exported task (default shapes_{task})
    data/eval/shapes_export.json          source, split, data version, counts (written last)
    data/eval/shapes/images/{key}.{ext}   the input image (bytes copied from the shard, in
                                          the sample's own format: png, jpg, webp)
    data/eval/shapes/targets/{key}.{ext}  the edited image (edit pairs)
    data/eval/shapes/objects/{key}.png    instance labels: 0 background, object z -> z + 1
    data/eval/shapes/masks/{id}.png       binary 0/255 mask of one REC / ReasonSeg target

Which suite task a shard task's documents feed is the `names` mapping: by default
``shapes_vqa`` etc. (the Shapes World task files); ``{"vqa": "vqav2_val"}`` writes a
converted VQAv2 split's questions as the documents of the suite's ``vqav2_val`` task (the
document fields are the same). A task without documents in the split is skipped and
reported (a VQA dataset has no edits), not an error.

Every document carries ``data_version`` (the shards' `dataset_version`) so the file hash the
suite falls back to changes with the data; `shapes_tasks` puts the version itself into each
TaskSpec so results.json records it. Boxes are xyxy pixels (x1, y1 exclusive).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from setokim.data.eval_common import png_bytes
from setokim.data.rle import bbox_of, decode_mask
from setokim.data.schema import SampleAnnotation
from setokim.data.shards import dataset_version, iter_tar_samples, read_manifest, sha256_file
from setokim.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

EVAL_DIR = Path("data") / "eval"
ASSET_DIR = "shapes"
EXPORT_MANIFEST = "shapes_export.json"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
EVAL_TASKS: tuple[str, ...] = (
    "caption",
    "vqa",
    "pope",
    "rec",
    "reasonseg",
    "edit",
    "t2i",
    "tokens",
)


def task_name(task: str) -> str:
    """The suite task name (and JSONL stem) of a Shapes World eval task."""
    return f"shapes_{task}"


def iter_split(shard_dir: str | Path, split: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of every sample of `split`, in manifest order.

    Shards are checked against the manifest's sha256 and counts, so the exported documents
    really belong to the data version they claim.
    """
    manifest = read_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in manifest (has {sorted(manifest['splits'])})")
    for info in manifest["splits"][split]["shards"]:
        path = Path(shard_dir) / info["name"]
        if not path.is_file():
            raise FileNotFoundError(f"shard_dir: shard {info['name']!r} is missing")
        if sha256_file(path) != info["sha256"]:
            raise ValueError(f"shard {info['name']!r}: sha256 differs from manifest.json")
        samples = dict(iter_tar_samples(path))
        if len(samples) != int(info["num_samples"]):
            raise ValueError(
                f"shard {info['name']!r}: {len(samples)} samples, manifest says {info['num_samples']}"
            )
        yield from samples.items()


def label_map(ann: SampleAnnotation) -> np.ndarray:
    """Instance-label map of the visible object masks: 0 background, object z -> z + 1."""
    dtype = np.uint8 if len(ann.objects) < 256 else np.uint16
    labels = np.zeros((ann.height, ann.width), dtype=dtype)
    for z, obj in enumerate(ann.objects):
        if obj.mask is not None:
            labels[decode_mask(obj.mask)] = z + 1
    return labels


class _Exporter:
    """Collects documents per task and writes each asset file once (atomically)."""

    def __init__(self, eval_dir: Path, version: str, split: str, tasks: Sequence[str]) -> None:
        self.eval_dir = eval_dir
        self.version = version
        self.split = split
        self.tasks = set(tasks)
        self.docs: dict[str, list[dict[str, Any]]] = {t: [] for t in EVAL_TASKS}
        self.skipped: dict[str, int] = {t: 0 for t in EVAL_TASKS}

    def _asset(self, folder: str, name: str, data: bytes, ext: str = "png") -> str:
        rel = f"{ASSET_DIR}/{folder}/{name}.{ext}"
        atomic_write_bytes(self.eval_dir / rel, data)
        return rel

    def _doc(self, task: str, doc_id: str, key: str, **fields: Any) -> None:
        if task not in self.tasks:
            return
        base = {"id": doc_id, "key": key, "split": self.split, "data_version": self.version}
        self.docs[task].append(base | fields)

    def _target(self, ann: SampleAnnotation, index: int) -> np.ndarray | None:
        """The visible mask of object `index`, or None when it is fully hidden."""
        if not 0 <= index < len(ann.objects) or ann.objects[index].mask is None:
            raise ValueError(f"sample {ann.key!r}: object_index {index} has no mask")
        mask = decode_mask(ann.objects[index].mask)
        return mask if mask.any() else None

    def add(self, key: str, files: dict[str, bytes]) -> None:
        files = {ext.lower(): data for ext, data in files.items()}
        ext = next((e for e in IMAGE_EXTS if e in files), None)
        if "json" not in files or ext is None:
            raise ValueError(
                f"sample {key!r}: needs .json and an image ({IMAGE_EXTS}) in the shard"
            )
        ann = SampleAnnotation.from_json(files["json"])
        image = self._asset("images", key, files[ext], ext)
        size = {"width": ann.width, "height": ann.height}
        if ann.captions:
            self._doc("caption", key, key, image=image, references=list(ann.captions))
        for j, q in enumerate(ann.vqa):
            self._doc(
                "vqa",
                f"{key}_vqa{j:02d}",
                key,
                image=image,
                question=q.question,
                answer=q.answer,
                answers=list(q.answers),
                question_type=q.qtype,
            )
        for j, p in enumerate(ann.pope):
            self._doc(
                "pope",
                f"{key}_pope{j:02d}",
                key,
                image=image,
                question=p.question,
                label=p.answer,
                category=p.split,
                object=p.object,
            )
        for task, items in (("rec", ann.rec), ("reasonseg", ann.reasonseg)):
            for j, r in enumerate(items if task in self.tasks else ()):
                doc_id = f"{key}_{task}{j:02d}"
                mask = self._target(ann, r.object_index)
                if mask is None:
                    self.skipped[task] += 1
                    continue
                rel = self._asset("masks", doc_id, png_bytes(mask.astype(np.uint8) * 255))
                text = {"expression": r.text} if task == "rec" else {"query": r.text}
                self._doc(
                    task,
                    doc_id,
                    key,
                    image=image,
                    **text,
                    **({"answer": r.answer} if r.answer else {}),
                    object_index=r.object_index,
                    box=bbox_of(mask),
                    box_format="xyxy",
                    mask=rel,
                    **size,
                )
        for j, e in enumerate(ann.edit if "edit" in self.tasks else ()):
            text = next((t for t in IMAGE_EXTS if f"target.{t}" in files), None)
            if text is None:
                raise ValueError(f"sample {key!r} has an edit but no target image")
            target = self._asset("targets", key, files[f"target.{text}"], text)
            self._doc(
                "edit",
                f"{key}_edit{j:02d}",
                key,
                image=image,
                instruction=e.instruction,
                op=e.op,
                target=target,
            )
        for j, caption in enumerate(ann.t2i):
            self._doc("t2i", f"{key}_t2i{j:02d}", key, caption=caption, target=image, **size)
        if ann.objects and "tokens" in self.tasks and any(o.mask for o in ann.objects):
            masks = self._asset("objects", key, png_bytes(label_map(ann)))
            self._doc(
                "tokens", key, key, image=image, masks=masks, num_objects=len(ann.objects), **size
            )


def export_names(names: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    """{shard task: suite task name}: None -> every task as shapes_*; a list of shard tasks
    -> those as shapes_*; a mapping as given (unknown shard tasks are an error)."""
    if names is None:
        return {t: task_name(t) for t in EVAL_TASKS}
    out = dict(names) if isinstance(names, Mapping) else {t: task_name(t) for t in names}
    bad = sorted(set(out) - set(EVAL_TASKS))
    if bad:
        raise ValueError(f"tasks {bad} cannot be exported from shards (known: {list(EVAL_TASKS)})")
    if not out:
        raise ValueError("no task to export")
    return out


def export_eval_data(
    shard_dir: str | os.PathLike[str],
    split: str,
    out_root: str | os.PathLike[str],
    *,
    limit: int | None = None,
    progress: bool = False,
    names: Mapping[str, str] | Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write the eval documents of `split` under `out_root` (see module doc).

    `limit` keeps the first N images of the split; `names` maps shard tasks to suite task
    names (`export_names`). Returns {suite task name: JSONL path} of the tasks that got
    documents; tasks without any are reported on stdout and skipped (none at all: an error).
    Asset files and JSONL files are written atomically; the export manifest comes last.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    wanted = export_names(names)
    version = dataset_version(shard_dir)
    manifest = read_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in manifest (has {sorted(manifest['splits'])})")
    source = str(manifest.get("info", {}).get("source", "shapes_world"))
    total = int(manifest["splits"][split]["num_samples"])
    count = total if limit is None else min(limit, total)
    if count == 0:
        raise ValueError(f"split {split!r} of shard_dir {str(shard_dir)!r} has no samples")
    eval_dir = Path(out_root) / EVAL_DIR
    exporter = _Exporter(eval_dir, version, split, list(wanted))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=count, desc=f"export {split}", unit="img")
    for n, (key, files) in enumerate(iter_split(shard_dir, split)):
        if n >= count:
            break
        exporter.add(key, files)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    paths: dict[str, Path] = {}
    for task, name in wanted.items():
        docs = sorted(exporter.docs[task], key=lambda d: d["id"])
        if not docs:
            print(f"export: {name}: skipped, the {count} images of {split!r} have no {task} items")
            continue
        text = "".join(json.dumps(d, sort_keys=True) + "\n" for d in docs)
        paths[name] = atomic_write_text(eval_dir / f"{name}.jsonl", text)
    if not paths:
        raise ValueError(
            f"split {split!r} of {str(shard_dir)!r} gave no documents for any of {list(wanted)}"
        )
    atomic_write_json(
        eval_dir / EXPORT_MANIFEST,
        {
            "source": source,
            "split": split,
            "limit": limit,
            "images": count,
            "dataset_version": version,
            "data_version": export_version(version, split, limit, source),
            "tasks": {
                wanted[t]: {"documents": len(exporter.docs[t]), "skipped": exporter.skipped[t]}
                for t in wanted
                if wanted[t] in paths
            },
        },
    )
    return paths


def export_version(
    version: str, split: str, limit: int | None, source: str = "shapes_world"
) -> str:
    """The data version an exported eval task reports: source, shards version, split, limit."""
    return f"{source}:{version}:{split}" + ("" if limit is None else f":first{limit}")


def read_export(data_root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The export manifest under `data_root` (None when nothing was exported there)."""
    path = Path(data_root) / EVAL_DIR / EXPORT_MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def suite_tasks(
    tasks_dir: str | os.PathLike[str], data_root: str | os.PathLike[str], names: Sequence[str]
) -> list[Any]:
    """The suite's TaskSpecs of `names` (any registered task); those exported from shards
    under `data_root` carry the shards' data version. A task whose document file is not
    under `data_root` is an error naming it and the tool that writes it."""
    from dataclasses import replace

    from setok_eval.registry import load_tasks

    export = read_export(data_root) or {"tasks": {}}
    specs = load_tasks(tasks_dir, list(names))
    missing = [
        f"{t.name} ({Path(data_root) / t.data_path})"
        for t in specs
        if not (Path(data_root) / t.data_path).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"data_root {str(data_root)!r} lacks the documents of {missing}: export them "
            "(tools/export_eval_data.py SHARDS --task vqa=NAME, or the benchmark exporters in "
            "tools/data/eval_*.py)"
        )
    return [
        replace(t, data_version=export["data_version"]) if t.name in export["tasks"] else t
        for t in specs
    ]


def shapes_tasks(
    tasks_dir: str | os.PathLike[str],
    data_root: str | os.PathLike[str],
    names: Sequence[str] | None = None,
) -> list[Any]:
    """The suite's shapes_* TaskSpecs with `data_version` set from the export manifest, so
    results.json records the shards' dataset version instead of a JSONL file hash."""
    from dataclasses import replace

    from setok_eval.registry import load_tasks

    path = Path(data_root) / EVAL_DIR / EXPORT_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"data_root {str(data_root)!r} has no {EVAL_DIR / EXPORT_MANIFEST}: "
            "run tools/export_eval_data.py first"
        )
    version = json.loads(path.read_text(encoding="utf-8"))["data_version"]
    wanted = list(names) if names is not None else [task_name(t) for t in EVAL_TASKS]
    bad = [n for n in wanted if not n.startswith("shapes_")]
    if bad:
        raise ValueError(f"names: not Shapes World tasks: {bad}")
    return [replace(t, data_version=version) for t in load_tasks(tasks_dir, wanted)]
