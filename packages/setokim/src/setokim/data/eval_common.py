"""Shared pieces of the benchmark exporters (tools/data/eval_export.py and the Shapes World
export in setokim.data.eval_export); a package module so the CLI imports it like any library.

Official benchmark files -> eval-suite documents (setok_eval JSON lines under
``OUT/data/eval/{task}.jsonl``). What every exporter needs is here once: reading the official
files with errors that name the file, field access that names file + record id + field,
image paths resolved (and checked) relative to the document file, and atomic writes of the
documents with a `data_version` that depends on the official files' contents, not on where
the images live, so two machines exporting the same release agree.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from setok_tokenizer.atomic import atomic_write_bytes, atomic_write_text

EVAL_DIR = Path("data") / "eval"


class ExportError(ValueError):
    """An official file or one of its records is not what the benchmark's format says."""


def record_error(file: str | os.PathLike[str], rid: Any, field: str, problem: str) -> ExportError:
    """The error for one bad record: names the file, the record id and the field."""
    return ExportError(f"{file}: record {rid!r}: field {field!r}: {problem}")


def need_file(path: str | os.PathLike[str], what: str) -> Path:
    """`path` as a Path; FileNotFoundError naming what the file is when it is missing."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """A JSON file; a missing or malformed file is an error naming it."""
    p = need_file(path, what)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ExportError(f"{p}: not valid JSON ({what}): {exc}") from exc


def read_json_lines(path: str | os.PathLike[str], what: str) -> list[dict[str, Any]]:
    """A JSON-lines file (one object per non-empty line); errors name file and line."""
    p = need_file(path, what)
    rows = []
    with open(p, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ExportError(f"{p}:{line_no}: not valid JSON ({what}): {exc}") from exc
            if not isinstance(row, dict):
                raise ExportError(f"{p}:{line_no}: expected a JSON object ({what})")
            rows.append(row)
    return rows


def field(
    rec: Mapping[str, Any], name: str, file: str | os.PathLike[str], rid: Any, kind: type | tuple
) -> Any:
    """`rec[name]`, checked to be of `kind` (bool is not an int); errors name file, id, field."""
    if not isinstance(rec, Mapping):
        raise record_error(file, rid, name, f"record is a {type(rec).__name__}, not an object")
    if name not in rec:
        raise record_error(file, rid, name, "missing")
    value = rec[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        want = " or ".join(k.__name__ for k in kinds)
        raise record_error(file, rid, name, f"expected {want}, got {value!r:.80}")
    if isinstance(value, str) and not value.strip():
        raise record_error(file, rid, name, "is empty")
    return value


def text_list(
    rec: Mapping[str, Any], name: str, file: str | os.PathLike[str], rid: Any, key: str | None
) -> list[str]:
    """A non-empty list of strings (`key` set: a list of objects whose `key` is the string)."""
    items = field(rec, name, file, rid, list)
    if not items:
        raise record_error(file, rid, name, "is an empty list")
    out = []
    for i, item in enumerate(items):
        value = item.get(key) if key is not None and isinstance(item, Mapping) else item
        if not isinstance(value, str):
            where = f"{name}[{i}]" + (f".{key}" if key else "")
            raise record_error(file, rid, where, f"expected a string, got {value!r:.80}")
        out.append(value)
    return out


class Documents:
    """Documents of one export: image paths relative to the document folder, unique ids,
    written atomically with the source files' version."""

    def __init__(self, out_root: str | os.PathLike[str], sources: Iterable[str | os.PathLike[str]],
                 options: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        self.eval_dir = Path(out_root) / EVAL_DIR
        self.version = source_version(sources, options or {})
        self.docs: dict[str, dict[str, dict[str, Any]]] = {}

    def image(self, path: str | os.PathLike[str], file: str | os.PathLike[str], rid: Any,
              name: str = "image") -> str:  # fmt: skip
        """Path of an existing image relative to the document folder (what `image` holds)."""
        p = Path(path)
        if not p.is_file():
            raise record_error(file, rid, name, f"image file not found: {p}")
        return os.path.relpath(p.resolve(), self.eval_dir.resolve())

    def asset(self, rel: str, data: bytes) -> str:
        """Write a file the documents refer to (decoded image, mask) under the document folder."""
        atomic_write_bytes(self.eval_dir / rel, data)
        return rel

    def add(self, task: str, doc: dict[str, Any], file: str | os.PathLike[str]) -> None:
        """Add a document to `task`; a repeated id is an error naming the file and the id."""
        docs = self.docs.setdefault(task, {})
        doc_id = str(doc["id"])
        if doc_id in docs:
            raise record_error(file, doc_id, "id", f"appears twice (task {task})")
        docs[doc_id] = {**doc, "id": doc_id, "data_version": self.version}

    def write(self) -> dict[str, Path]:
        """Write every task's documents (sorted by id) as `{task}.jsonl`; returns the paths."""
        paths = {}
        for task, docs in sorted(self.docs.items()):
            if not docs:
                raise ExportError(f"task {task}: the official files gave no documents")
            lines = [json.dumps(docs[k], ensure_ascii=False, sort_keys=True) for k in sorted(docs)]
            paths[task] = atomic_write_text(
                self.eval_dir / f"{task}.jsonl", "\n".join(lines) + "\n"
            )
        return paths


def source_version(sources: Iterable[str | os.PathLike[str]], options: Mapping[str, Any]) -> str:
    """sha256 over the official annotation files' bytes and the export options."""
    h = hashlib.sha256(json.dumps(dict(options), sort_keys=True, default=str).encode())
    for src in sources:
        with open(src, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    return f"sha256:{h.hexdigest()[:16]}"


def png_bytes(array: np.ndarray) -> bytes:
    """PNG encoding of a uint8 image or mask array."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
