"""Planning a task mix from the annotations alone (steps 5 and 6 of the loader's epoch order).

A mix draws one task per sample among the tasks that sample has and groups the drawn items
into full single-task batches. Both only need each sample's item counts per task, which
`index_shard` takes from the shard's sidecar index (written with the shard, see
`setokim.data.shards`) or, for a shard without a valid one, reads from the .json members of
the tar without touching the images; so a rank can plan (and a resume can replay) an epoch
cheaply, and `setokim.data.loader` then reads and decodes only what the plan puts in its
batches. Both routes give identical entries.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from setokim.data.schema import TASKS
from setokim.data.shard_index import (
    ITEM_FIELDS,
    annotation_counts,
    annotation_of,
    index_stale_reason,
    read_shard_index,
)
from setokim.data.shards import MANIFEST_NAME, iter_tar_samples, read_manifest

__all__ = [
    "ITEM_FIELDS",
    "IndexEntry",
    "MixPlan",
    "clear_index_cache",
    "draw_task",
    "index_shard",
    "manifest_entry",
    "plan_mix",
    "scan_shard",
]

log = logging.getLogger("setokim.data")


@dataclass(frozen=True)
class IndexEntry:
    """One sample of a shard as its annotation shows it (no image is read)."""

    shard: str
    key: str
    items: tuple[int, ...] | None  # items per task, in TASKS order; None: unreadable annotation
    error: str = ""


_INDEX: dict[tuple[str, int, int], list[IndexEntry]] = {}
_MANIFESTS: dict[tuple[str, int, int], dict[str, dict[str, Any]]] = {}
_LOGGED: set[tuple[str, str]] = set()


def clear_index_cache() -> None:
    """Forget every shard index read in this process (benchmarks; tests that rewrite shards)."""
    _INDEX.clear()
    _MANIFESTS.clear()


def _entry(shard: str, key: str, data: bytes | None) -> IndexEntry:
    items, error = annotation_counts(data)
    return IndexEntry(shard, key, items, error)


def scan_shard(path: Path) -> list[IndexEntry]:
    """The index of one shard read from its tar: only the .json members (tarfile seeks past
    the images), grouped by key the way webdataset groups them. A shard that cannot be read
    gives the samples before the failure (the loader reports the failure when it reads it).
    """
    entries: list[IndexEntry] = []
    try:
        for key, files in iter_tar_samples(path, read=lambda ext: ext.lower() == "json"):
            entries.append(_entry(path.name, key, annotation_of(files)))
    except (OSError, tarfile.TarError, EOFError):
        pass
    return entries


def manifest_entry(path: Path) -> dict[str, Any] | None:
    """The manifest entry (name, sha256, bytes, num_samples, ...) of shard `path`, from the
    manifest.json beside it (cached per manifest size and mtime); None if there is none."""
    mpath = path.parent / MANIFEST_NAME
    try:
        st = mpath.stat()
    except OSError:
        return None
    ck = (str(mpath.resolve()), st.st_size, st.st_mtime_ns)
    if ck not in _MANIFESTS:
        try:
            manifest = read_manifest(path.parent)
        except (OSError, ValueError):
            return None
        _MANIFESTS[ck] = {
            s["name"]: s for body in manifest["splits"].values() for s in body["shards"]
        }
    return _MANIFESTS[ck].get(path.name)


def _log_once(path: Path, kind: str, msg: str, *args: object) -> None:
    tag = (str(path.parent), kind)
    if tag not in _LOGGED:
        _LOGGED.add(tag)
        log.warning(msg, *args)


def _from_sidecar(path: Path, size: int) -> list[IndexEntry] | None:
    """The entries of a sidecar that matches the shard's manifest entry, else None (logged
    once per process and dir: the caller then scans the tar)."""
    try:
        index = read_shard_index(path)
    except (OSError, ValueError) as exc:
        _log_once(path, "bad", "unreadable shard index (%s); scanning the tars instead", exc)
        return None
    if index is None:
        _log_once(
            path, "missing",
            "%s has no shard index sidecar (first: %s); planning a mix scans every tar "
            "(write them with tools/data/index_shards.py)", path.parent, path.name,
        )  # fmt: skip
        return None
    entry = manifest_entry(path)
    why = "no manifest entry" if entry is None else index_stale_reason(index, entry, size)
    if why:
        _log_once(path, "stale", "stale shard index of %s (%s); scanning the tars", path, why)
        return None
    return [IndexEntry(path.name, k, c, err) for k, c, err in index.rows]


def index_shard(path: Path) -> list[IndexEntry]:
    """The samples of one shard in tar order with their item counts per task.

    From the sidecar when it matches the manifest's entry for the shard (sha256, size and
    count; the tar is not hashed), else from `scan_shard`; cached per process by
    (path, size, mtime).
    """
    try:
        st = path.stat()
    except OSError:
        return []
    cache_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if cache_key not in _INDEX:
        side = _from_sidecar(path, st.st_size)
        _INDEX[cache_key] = side if side is not None else scan_shard(path)
    return _INDEX[cache_key]


def draw_task(
    seed: int, epoch: int, key: str, items: Sequence[int], weights: dict[str, float]
) -> str | None:
    """The task a mix draws for one sample: among the weighted tasks it has, renormalised.

    A hash of (seed, epoch, key) instead of a generator per sample: the same on every rank,
    worker and resume, and cheap enough to plan a million samples.
    """
    have = [(t, w) for t, w in weights.items() if w > 0 and items[TASKS.index(t)] > 0]
    if not have:
        return None
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2.0**64 * sum(w for _, w in have)
    for t, w in have:
        u -= w
        if u < 0:
            return t
    return have[-1][0]


@dataclass
class MixPlan:
    """One rank's epoch of a task mix: which items make which batch (from annotations)."""

    keys: list[str] = field(default_factory=list)  # the sample key at each stream position
    # batch k = (task, [(stream position, first item, end item)]), full, in emission order
    batches: list[tuple[str, list[tuple[int, int, int]]]] = field(default_factory=list)
    done_at: list[int] = field(default_factory=list)  # the position that completes batch k
    items: dict[str, int] = field(default_factory=dict)  # items drawn per task (with leftovers)
    no_task: int = 0  # samples with none of the mix's tasks (skipped)
    bad: list[IndexEntry] = field(default_factory=list)  # unreadable annotations (skipped)


def plan_mix(
    order: Iterable[IndexEntry],
    weights: dict[str, float],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    expand: bool,
) -> MixPlan:
    """Steps 5 and 6 of the epoch order over one rank's samples `order` (stream order)."""
    plan = MixPlan(items={t: 0 for t, w in weights.items() if w > 0})
    open_: dict[str, list[tuple[int, int, int]]] = {}
    fill: dict[str, int] = {}
    for pos, e in enumerate(order):
        plan.keys.append(e.key)
        if e.items is None:
            plan.bad.append(e)
            continue
        task = draw_task(seed, epoch, e.key, e.items, weights)
        if task is None:
            plan.no_task += 1
            continue
        n = e.items[TASKS.index(task)] if expand else 1
        plan.items[task] += n
        j = 0
        while j < n:
            take = min(n - j, batch_size - fill.get(task, 0))
            open_.setdefault(task, []).append((pos, j, j + take))
            fill[task] = fill.get(task, 0) + take
            j += take
            if fill[task] == batch_size:
                plan.batches.append((task, open_.pop(task)))
                plan.done_at.append(pos)
                fill[task] = 0
    return plan
