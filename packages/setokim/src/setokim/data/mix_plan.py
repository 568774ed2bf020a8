"""Planning a task mix from the annotations alone (steps 5 and 6 of the loader's epoch order).

A mix draws one task per sample among the tasks that sample has and groups the drawn items
into full single-task batches. Both only need each sample's item counts per task, which
`index_shard` reads from the .json members of a shard without touching the images, so a
rank can plan (and a resume can replay) an epoch cheaply; `setokim.data.loader` then reads
and decodes only what the plan puts in its batches.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from setokim.data.schema import TASKS


@dataclass(frozen=True)
class IndexEntry:
    """One sample of a shard as its annotation shows it (no image is read)."""

    shard: str
    key: str
    items: tuple[int, ...] | None  # items per task, in TASKS order; None: unreadable annotation
    error: str = ""


_INDEX: dict[tuple[str, int, int], list[IndexEntry]] = {}


# the annotation list behind each task (SampleAnnotation.num_items counts the same lists;
# read from the JSON directly: parsing every object of an annotation costs ~5x more)
ITEM_FIELDS = {t: {"caption": "captions", "chat": "conversations"}.get(t, t) for t in TASKS}


def _entry(shard: str, key: str, data: bytes | None) -> IndexEntry:
    if data is None:
        return IndexEntry(shard, key, None, "no .json annotation")
    try:
        ann = json.loads(data)
        if not isinstance(ann, dict):
            raise ValueError("annotation is not a JSON object")
        return IndexEntry(shard, key, tuple(len(ann.get(ITEM_FIELDS[t]) or ()) for t in TASKS))
    except (ValueError, TypeError) as exc:
        return IndexEntry(shard, key, None, f"cannot decode: {type(exc).__name__}: {exc}")


def index_shard(path: Path) -> list[IndexEntry]:
    """The samples of one shard in tar order with their item counts per task.

    Reads only the .json members (tarfile seeks past the images), grouped by key the way
    webdataset groups them; cached per process by (path, size, mtime). A shard that cannot
    be read gives the samples before the failure (the loader reports the failure itself when
    it reads the shard).
    """
    try:
        st = path.stat()
    except OSError:
        return []
    cache_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if cache_key in _INDEX:
        return _INDEX[cache_key]
    entries: list[IndexEntry] = []
    key: str | None = None
    data: bytes | None = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                prefix, suffix = base_plus_ext(member.name)
                if prefix is None:
                    continue
                if prefix != key:
                    if key is not None:
                        entries.append(_entry(path.name, key, data))
                    key, data = prefix, None
                if suffix.lower() == "json":
                    f = tar.extractfile(member)
                    data = f.read() if f is not None else None
        if key is not None:
            entries.append(_entry(path.name, key, data))
    except (OSError, tarfile.TarError, EOFError):
        pass
    _INDEX[cache_key] = entries
    return entries


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
