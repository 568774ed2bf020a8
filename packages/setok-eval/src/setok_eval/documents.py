"""Task documents: one JSON object per line with a unique "id"; file fields resolved."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image

from setok_eval.io import file_hash
from setok_eval.registry import METRICS, TaskSpec

# Document fields that hold file paths, relative to the document file's folder.
FILE_FIELDS = ("image", "target", "mask", "masks")


def load_documents(
    task: TaskSpec, data_root: str | os.PathLike[str] | None = None
) -> tuple[list[dict[str, Any]], str]:
    """Documents of a task (sorted by id) and the data version: explicit in the task, else
    the `data_version` the documents carry, else a hash of the file."""
    path = task.resolve_data(data_root)
    if not path.is_file():
        raise FileNotFoundError(f"task {task.name!r}: data file not found: {path}")
    docs: list[dict[str, Any]] = []
    seen: set[str] = set()
    needed = {f for m in task.metrics for f in METRICS[m.metric].doc_fields}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"task {task.name!r}: {path}:{line_no} is not JSON: {exc}"
                ) from exc
            if not isinstance(doc, dict) or "id" not in doc:
                raise ValueError(f"task {task.name!r}: {path}:{line_no} needs an 'id' field")
            doc["id"] = str(doc["id"])
            if doc["id"] in seen:
                raise ValueError(f"task {task.name!r}: duplicate document id {doc['id']!r}")
            seen.add(doc["id"])
            missing = sorted(needed - set(doc))
            if missing:
                raise ValueError(
                    f"task {task.name!r}: document {doc['id']!r} lacks field(s) {missing}"
                )
            for key in FILE_FIELDS:
                if isinstance(doc.get(key), str):
                    doc[key] = str((path.parent / doc[key]).resolve())
            docs.append(doc)
    docs.sort(key=lambda d: d["id"])
    return docs, task.data_version or documents_version(docs) or f"sha256:{file_hash(path)}"


def documents_version(docs: list[dict[str, Any]]) -> str | None:
    """The dataset version the documents themselves carry (`data_version`, as our exporters
    write it) when all agree; None when absent. Documents of two versions in one file are an
    error: the file mixes releases."""
    versions = {str(d["data_version"]) for d in docs if "data_version" in d}
    if not versions:
        return None
    if len(versions) > 1 or any("data_version" not in d for d in docs):
        raise ValueError(
            f"documents carry more than one data_version (or some lack it): {sorted(versions)}"
        )
    return versions.pop()


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """An RGB image file as HxWx3 uint8."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def load_label_map(path: str | os.PathLike[str]) -> np.ndarray:
    """A mask / instance-label PNG as an int64 map (binary masks come out 0/1 or 0/255)."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., 0]
    return arr.astype(np.int64)


def format_prompt(task: TaskSpec, doc: dict[str, Any]) -> str:
    """Fill the task's prompt template from document fields (clear error on a missing one)."""
    try:
        return task.prompt.format(**doc)
    except KeyError as exc:
        raise KeyError(
            f"task {task.name!r}: prompt needs field {exc.args[0]!r}, missing in document {doc['id']!r}"
        ) from exc
