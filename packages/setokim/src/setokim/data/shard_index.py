"""A shard's task-index sidecar: what a task mix needs to plan, without reading the tar.

Next to each shard `X.tar` the shard writer puts `X.tar.index.json` (`index_name`): in tar
order, every sample's key and its item count per task, plus the shard's sha256, size and
sample count. Planning a task mix (`setokim.data.mix_plan`) reads these instead of every
annotation in every tar. The sidecar's name follows from the shard's, so the manifest does
not record it (manifests and data versions are unchanged), and it holds no shard name, so a
renamed (linked) shard keeps a valid sidecar. A sidecar is trusted only when its sha256,
size and count equal the manifest's entry for the shard (`index_stale_reason`); datasets
without sidecars still work (the planner scans the tar).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from setokim.data.schema import TASKS
from setokim.utils.io import atomic_write_text

INDEX_SUFFIX = ".index.json"
INDEX_FORMAT = "setok-shard-index-1"

# the annotation list behind each task (SampleAnnotation.num_items counts the same lists;
# read from the JSON directly: parsing every object of an annotation costs ~5x more)
ITEM_FIELDS = {t: {"caption": "captions", "chat": "conversations"}.get(t, t) for t in TASKS}

Counts = tuple[int, ...]
# one sample of a shard index: (key, items per task in TASKS order or None, error if None)
IndexRow = tuple[str, Counts | None, str]


def annotation_counts(data: bytes | None) -> tuple[Counts | None, str]:
    """Items per task (TASKS order) that one sample's annotation JSON offers, or (None, why).

    The one definition behind both the sidecar index and the tar scan of `mix_plan`.
    """
    if data is None:
        return None, "no .json annotation"
    try:
        ann = json.loads(data)
        if not isinstance(ann, dict):
            raise ValueError("annotation is not a JSON object")
        return tuple(len(ann.get(ITEM_FIELDS[t]) or ()) for t in TASKS), ""
    except (ValueError, TypeError) as exc:
        return None, f"cannot decode: {type(exc).__name__}: {exc}"


def annotation_of(files: dict[str, bytes]) -> bytes | None:
    """The member a tar scan takes as the annotation: the last with extension json (any case)."""
    found = None
    for ext in sorted(files):
        if ext.lower() == "json":
            found = files[ext]
    return found


def index_name(shard: str) -> str:
    """The sidecar index file name of shard file `shard` ("train-000000.tar.index.json")."""
    return shard + INDEX_SUFFIX


@dataclass(frozen=True)
class ShardIndex:
    """A shard's sidecar: the shard it describes (sha256, bytes) and its rows in tar order."""

    sha256: str
    bytes: int
    tasks: tuple[str, ...]
    rows: list[IndexRow]


def write_shard_index(
    shard_path: str | Path, sha256: str, nbytes: int, rows: list[IndexRow]
) -> Path:
    """Atomically write the sidecar of `shard_path` (compact JSON: it is read, not diffed)."""
    body = {
        "format": INDEX_FORMAT,
        "sha256": sha256,
        "bytes": int(nbytes),
        "num_samples": len(rows),
        "tasks": list(TASKS),
        "samples": [[k, list(c)] if c is not None else [k, None, err] for k, c, err in rows],
    }
    path = Path(shard_path)
    text = json.dumps(body, sort_keys=True, separators=(",", ":")) + "\n"
    return atomic_write_text(path.with_name(index_name(path.name)), text)


def read_shard_index(shard_path: str | Path) -> ShardIndex | None:
    """The sidecar of `shard_path`; None when there is none; ValueError when malformed."""
    path = Path(shard_path)
    side = path.with_name(index_name(path.name))
    try:
        text = side.read_text()
    except FileNotFoundError:
        return None
    try:
        body = json.loads(text)
        if body.get("format") != INDEX_FORMAT:
            raise ValueError(f"format must be {INDEX_FORMAT!r}, got {body.get('format')!r}")
        rows: list[IndexRow] = []
        for row in body["samples"]:
            counts = row[1]
            if counts is None:
                rows.append((str(row[0]), None, str(row[2])))
            else:
                rows.append((str(row[0]), tuple(int(c) for c in counts), ""))
        if len(rows) != int(body["num_samples"]):
            raise ValueError(f"holds {len(rows)} samples, says {body['num_samples']}")
        return ShardIndex(str(body["sha256"]), int(body["bytes"]), tuple(body["tasks"]), rows)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ValueError(f"{side.name}: malformed shard index: {exc}") from exc


def index_stale_reason(index: ShardIndex, entry: dict[str, Any], size: int) -> str:
    """Why `index` does not describe the shard of manifest `entry` on disk ("" if it does).

    Compares the recorded sha256 with the manifest's (no hashing of the tar), and the sizes
    and counts: a shard rewritten with its manifest (another seed, a re-conversion) changes
    the sha256; one cut or grown in place changes its size. A same-size edit in place that
    leaves the manifest stale is what `check_shards` (full hash) is for.
    """
    if index.tasks != TASKS:
        return f"tasks {list(index.tasks)} != {list(TASKS)}"
    if index.sha256 != entry["sha256"]:
        return f"sha256 {index.sha256[:12]}... != manifest {str(entry['sha256'])[:12]}..."
    if not index.bytes == int(entry["bytes"]) == size:
        return f"bytes {index.bytes} (index) / {entry['bytes']} (manifest) / {size} (file)"
    if len(index.rows) != int(entry["num_samples"]):
        return f"{len(index.rows)} samples, manifest says {entry['num_samples']}"
    return ""
