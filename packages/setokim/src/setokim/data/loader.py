"""One loader for every task view over webdataset shards.

Order of an epoch (the same on every rank, so ranks agree without talking):
1. shards in a permutation seeded by (seed, epoch) (manifest order if shuffle=False);
2. split by rank: whole shards round-robin when there are at least `world_size` shards
   ("shard" mode), else every rank reads all shards and keeps stream position p with
   p % world_size == rank ("sample" mode); either way no sample goes to two ranks;
3. a seeded shuffle buffer per rank on the raw (undecoded) samples;
4. with `even`, every rank keeps the same count (the smallest rank's, from the manifest);
then, for one task (task != "mix"):
5. the first `start_sample` samples are skipped undecoded (resume);
6. the rest is cut into chunks of `batch_size`; a sample without the task adds no item, so
   such a chunk gives a short batch (or none). (With `expand`, one task is planned as a
   one-task mix, below: every item of every sample once, in full batches.) DataLoader worker w decodes chunks c % num_workers == w and returns
   one list per chunk (its batches, maybe none); torch's DataLoader takes the workers'
   lists round-robin and the loader flattens them, so the batch order does not depend on
   num_workers.
For a task mix (task="mix", or one task with `expand`; see `plan_mix`, which reads only the
annotations):
5. every sample draws one task among the mix tasks it has (weights restricted to those and
   renormalised; the draw is seeded by (seed, epoch, key), so every rank, worker and resume
   agrees); a sample with none of them is skipped, counted and logged at the end of the epoch;
6. the drawn items wait (undecoded) in one buffer per task; when a buffer holds
   `batch_size` items they become the next batch, so every batch is full and of one task.
   With `expand` every item of the sample goes to the drawn task; items that overflow the
   open batch start the task's next batch (the sample is then decoded by both). Items left
   in the buffers at the end of the epoch are dropped. With `even`, every rank keeps the
   smallest rank's batch count;
7. the first `start_batch` batches are skipped (their samples are passed, never read);
   worker w decodes batches start_batch + w, + 2w, ... (every num_workers-th), again
   returned round-robin as one list each (empty when every item failed to decode).

What a process reads: every DataLoader worker walks the rank's whole stream (steps 1-4), so
the positions, the rank split and the shuffle buffer are the same in each, but it reads the
bytes of only the samples it decodes; the others pass as key-only stubs (`__key__`,
`__url__`) whose members tarfile seeks past (`setokim.data.shards.iter_tar_groups`). A worker
learns the keys of its positions without reading a tar's images: the same steps 1-4 over the
shards' indexes (`index_shard`: sidecars, else a scan of the .json members; cached per
process, and indexed once in the main process before workers fork). One task with
num_workers > 1: the keys at positions >= start_sample in its chunks; with 0 or 1 workers
everything is read and no index is needed. A mix (its plan already holds every key): the
samples of its batches only. A stream key that differs from the index's (shards changed after
indexing) raises DataError.

Errors: a shard that cannot be read, holds fewer samples than the manifest says, or a sample
that cannot be decoded raises DataError naming the shard and key (on_error="raise"), or is
logged and counted (on_error="skip"); a skipped sample leaves its batch one item short.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from setokim.data.collate import collate
from setokim.data.config import DataConfig
from setokim.data.decode import DataError, decode_sample
from setokim.data.mix_plan import IndexEntry, MixPlan, index_shard, plan_mix
from setokim.data.schema import TASKS, VIEWS
from setokim.data.shards import iter_tar_groups, raw_sample, read_manifest
from setokim.data.views import items_for

log = logging.getLogger("setokim.data")

DEFAULT_MIX = {t: 1.0 for t in TASKS if t != "chat"}

T = TypeVar("T")


@dataclass
class RankPlan:
    """What one rank reads in one epoch."""

    shards: list[tuple[Path, int]]  # (path, sample count from the manifest), in read order
    mode: str  # "shard" | "sample"
    count: int  # samples this rank yields (after `even`)


def plan_rank(
    shard_dir: str | Path,
    split: str,
    rank: int,
    world_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    even: bool = True,
    split_mode: str = "auto",
) -> RankPlan:
    """Steps 1, 2 and 4 of the epoch order (see the module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if split_mode not in ("auto", "shard", "sample"):
        raise ValueError(f"split_mode must be auto|shard|sample, got {split_mode!r}")
    manifest = read_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in manifest (has {sorted(manifest['splits'])})")
    shards = [
        (Path(shard_dir) / s["name"], int(s["num_samples"]))
        for s in manifest["splits"][split]["shards"]
    ]
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(shards))
        shards = [shards[i] for i in order]
    mode = split_mode
    if mode == "auto":
        mode = "shard" if len(shards) >= world_size else "sample"
    if mode == "shard":
        if len(shards) < world_size:
            raise ValueError(
                f"split_mode='shard' needs >= world_size={world_size} shards, split {split!r} has {len(shards)}"
            )
        counts = [sum(n for _, n in shards[r::world_size]) for r in range(world_size)]
        mine = shards[rank::world_size]
    else:
        total = sum(n for _, n in shards)
        counts = [len(range(r, total, world_size)) for r in range(world_size)]
        mine = shards
    count = min(counts) if even else counts[rank]
    return RankPlan(mine, mode, count)


_WARNED_ABSENT: set[tuple[str, str, str]] = set()


class ShardDataset(IterableDataset):
    """Yields collated batches of one rank; see the module docstring for the order."""

    def __init__(
        self, cfg: DataConfig, rank: int = 0, world_size: int = 1, split_mode: str = "auto"
    ) -> None:
        super().__init__()
        if cfg.task not in (*VIEWS, "mix"):
            raise ValueError(f"task must be one of {(*VIEWS, 'mix')}, got {cfg.task!r}")
        if cfg.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {cfg.on_error!r}")
        if cfg.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
        self.cfg = cfg
        self.rank, self.world_size, self.split_mode = rank, world_size, split_mode
        self.start_sample = 0  # resume position of a single task (samples)
        self.start_batch = 0  # resume position of a mix (batches)
        self.skipped = 0
        self.bytes_read = 0  # tar member bytes this process read (benchmarks; not the headers)
        weights = dict(cfg.mix_weights or DEFAULT_MIX)
        for t, w in weights.items():
            if t not in TASKS or w < 0:
                raise ValueError(f"mix_weights: {t!r}={w} (tasks {TASKS}, weights >= 0)")
        if cfg.task == "mix" and sum(weights.values()) <= 0:
            raise ValueError("mix_weights must have a positive weight")
        # one task with expand: every item once in full batches = a one-task mix
        self.planned = cfg.task == "mix" or (cfg.expand and cfg.task in TASKS)
        self.mix_weights = weights if cfg.task == "mix" else {cfg.task: 1.0}
        self.mix: MixPlan | None = None
        self.rank_items: list[dict[str, int]] = []  # items drawn per task, every rank (mix)
        self.plan = self._plan(rank)
        if self.planned:
            self._plan_mix()

    def _plan(self, rank: int) -> RankPlan:
        c = self.cfg
        return plan_rank(
            c.shard_dir, c.split, rank, self.world_size,
            seed=c.seed, epoch=c.epoch, shuffle=c.shuffle, even=c.even, split_mode=self.split_mode,
        )  # fmt: skip

    def _plan_mix(self) -> None:
        """Plan this epoch of the mix for every rank (needed for `even` and the counts)."""
        c = self.cfg
        plans = [self._plan(r) for r in range(self.world_size)]
        index = {p: index_shard(p) for rp in plans for p, _ in rp.shards}
        self._warn_absent(index)
        mixes = [
            plan_mix(
                self._rank_order([index[p] for p, _ in rp.shards], rp, r),
                self.mix_weights,
                c.batch_size,
                seed=c.seed,
                epoch=c.epoch,
                expand=c.expand,
            )  # fmt: skip
            for r, rp in enumerate(plans)
        ]
        mine = mixes[self.rank]
        if c.even:
            n = min(len(m.batches) for m in mixes)
            mine.batches, mine.done_at = mine.batches[:n], mine.done_at[:n]
        self.mix, self.rank_items = mine, [m.items for m in mixes]
        for e in mine.bad:
            self._fail(DataError(e.shard, e.key, e.error))

    def _warn_absent(self, index: dict[Path, list[IndexEntry]]) -> None:
        """Warn once per process for each weighted mix task that no sample of the split has."""
        have = [
            any(e.items and e.items[i] for es in index.values() for e in es)
            for i in range(len(TASKS))
        ]
        for t, w in self.mix_weights.items():
            tag = (str(self.cfg.shard_dir), self.cfg.split, t)
            if w > 0 and not have[TASKS.index(t)] and tag not in _WARNED_ABSENT:
                _WARNED_ABSENT.add(tag)
                log.warning(
                    "mix task %r (weight %g) is in no sample of split %r of %s: never drawn",
                    t, w, self.cfg.split, self.cfg.shard_dir,
                )  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.cfg.epoch:
            return  # the plans are pure functions of the epoch: nothing to redo
        self.cfg.epoch = epoch
        self.plan = self._plan(self.rank)
        if self.planned:
            self._plan_mix()

    def _fail(self, err: DataError) -> None:
        if self.cfg.on_error == "raise":
            raise err
        self.skipped += 1
        log.warning("skipping (%d so far): %s", self.skipped, err)

    def _read_shard(
        self, path: Path, expected: int, owned: set[str] | None = None
    ) -> Iterator[dict[str, Any]]:
        """One shard's samples in tar order as webdataset's dicts. With `owned`, only the
        members of those keys are read; every other sample is a stub (`__key__`, `__url__`)
        that keeps its stream position without its bytes."""
        read = None if owned is None else (lambda key, _ext: key in owned)
        n, last = 0, None
        try:
            for key, members in iter_tar_groups(path, read):
                raw = raw_sample(key, path.name, members)
                n, last = n + 1, key
                self.bytes_read += sum(len(data) for _, data in members)
                yield raw
        except Exception as exc:  # noqa: BLE001 - tar/IO errors name the shard
            self._fail(
                DataError(
                    path.name, last, f"unreadable after {n} samples: {type(exc).__name__}: {exc}"
                )
            )
            return
        if n != expected:
            self._fail(
                DataError(
                    path.name,
                    last,
                    f"holds {n} samples, manifest says {expected} (truncated or corrupt after this key)",
                )
            )

    def _rank_order(self, shards: Sequence[Iterable[T]], plan: RankPlan, rank: int) -> Iterator[T]:
        """Steps 2-4 over per-shard sequences (raw samples, or their index entries)."""
        c = self.cfg
        stream: Iterator[T] = (x for s in shards for x in s)
        if plan.mode == "sample":
            stream = (x for p, x in enumerate(stream) if p % self.world_size == rank)
        if c.shuffle and c.shuffle_buffer > 1:
            rng = np.random.default_rng([c.seed, c.epoch, rank, 7])
            stream = _buffer_shuffle(stream, c.shuffle_buffer, rng)
        for p, x in enumerate(stream):
            if p >= plan.count:
                return
            yield x

    def raw_stream(self, owned: set[str] | None = None) -> Iterator[dict[str, Any]]:
        """Steps 1-4: this rank's undecoded samples in epoch order (exactly plan.count).

        With `owned`, samples whose key is not in it are stubs without their bytes."""
        shards = [self._read_shard(path, n, owned) for path, n in self.plan.shards]
        return self._rank_order(shards, self.plan, self.rank)

    def epoch_keys(self) -> list[str]:
        """This rank's sample keys in epoch order (steps 1-4) from the shard indexes: no image
        is read (sidecars, else a scan of the .json members; cached per process)."""
        shards = [[e.key for e in index_shard(path)] for path, _ in self.plan.shards]
        return list(self._rank_order(shards, self.plan, self.rank))

    @property
    def full_batches(self) -> int:
        """Full batches in this epoch from its start (a mix: exact; one task: count // bsz)."""
        if self.mix is not None:
            return len(self.mix.batches)
        return self.plan.count // self.cfg.batch_size

    def __len__(self) -> int:
        """Batches this rank yields from the resume position (one task: exact when every
        sample has the task and expand is off)."""
        if self.mix is not None:
            return max(0, len(self.mix.batches) - self.start_batch)
        left = max(0, self.plan.count - self.start_sample)
        return -(-left // self.cfg.batch_size)

    def _items(
        self, raw: dict[str, Any], task: str, start: int, stop: int | None
    ) -> list[dict[str, Any]]:
        """Items [start, stop) of one raw sample for `task`; [] (counted) if it cannot decode."""
        c = self.cfg
        try:
            d = decode_sample(raw, c.image_size)
            return items_for(d, task, seed=c.seed, epoch=c.epoch, expand=c.expand)[start:stop]
        except DataError as err:
            self._fail(err)
        except Exception as exc:  # noqa: BLE001 - bad annotations name shard and key
            self._fail(
                DataError(
                    str(raw.get("__url__")), str(raw.get("__key__")), f"{type(exc).__name__}: {exc}"
                )
            )
        return []

    def _batches(self, raws: list[dict[str, Any]]) -> list[dict[str, Any]]:
        task, bsz = self.cfg.task, self.cfg.batch_size
        items = [it for raw in raws for it in self._items(raw, task, 0, None)]
        return [collate(items[i : i + bsz], task) for i in range(0, len(items), bsz)]

    def _iter_single(self, wid: int, nw: int) -> Iterator[list[dict[str, Any]]]:
        bsz, start, chunk, buf = self.cfg.batch_size, self.start_sample, 0, []
        keys: list[str] | None = None
        owned: set[str] | None = None
        if nw > 1:  # read only this worker's chunks (one worker reads everything anyway)
            keys = self.epoch_keys()
            owned = {k for p, k in enumerate(keys) if p >= start and (p - start) // bsz % nw == wid}
        for p, raw in enumerate(self.raw_stream(owned)):
            if keys is not None:
                _check_position(p, raw, keys)
            if p < start:
                continue
            if chunk % nw == wid:
                buf.append(raw)
            if (p - start + 1) % bsz == 0:
                if buf:
                    yield self._batches(buf)
                chunk, buf = chunk + 1, []
        if buf:
            yield self._batches(buf)

    def _iter_mix(self, mix: MixPlan, wid: int, nw: int) -> Iterator[list[dict[str, Any]]]:
        """Step 7: read the stream, hold the raw samples of this worker's pending batches."""
        mine = list(range(self.start_batch + wid, len(mix.batches), nw))
        last_use = {pos: k for k in mine for pos, _, _ in mix.batches[k][1]}
        held: dict[int, dict[str, Any]] = {}
        nxt = 0
        for p, raw in enumerate(self.raw_stream({mix.keys[pos] for pos in last_use})):
            if nxt == len(mine):
                break
            _check_position(p, raw, mix.keys)
            if p in last_use:
                held[p] = raw
            while nxt < len(mine) and mix.done_at[mine[nxt]] == p:
                k = mine[nxt]
                task, pieces = mix.batches[k]
                items = [it for pos, a, b in pieces for it in self._items(held[pos], task, a, b)]
                for pos, _, _ in pieces:
                    if last_use[pos] == k:
                        del held[pos]
                nxt += 1
                yield [collate(items, task)] if items else []
        if wid == 0 and mix.no_task:
            log.warning(
                "epoch %d rank %d: %d samples have none of the mix tasks %s; skipped",
                self.cfg.epoch, self.rank, mix.no_task,
                sorted(t for t, w in self.mix_weights.items() if w > 0),
            )  # fmt: skip

    def worker_units(self, wid: int, nw: int) -> Iterator[list[dict[str, Any]]]:
        """What DataLoader worker `wid` of `nw` returns: one list per unit it owns (a chunk of
        one task, a batch of a mix), in order, holding that unit's batches (maybe none).

        Units go round-robin to the workers and torch takes one item from each worker in
        turn, so the flattened lists are the same batches for any num_workers, even when a
        chunk gives several batches (expand) or none (no sample has the task)."""
        if nw < 1 or not 0 <= wid < nw:
            raise ValueError(f"need 0 <= wid < nw, got wid={wid}, nw={nw}")
        if self.mix is not None:
            return self._iter_mix(self.mix, wid, nw)
        return self._iter_single(wid, nw)

    def iter_worker(self, wid: int, nw: int) -> Iterator[dict[str, Any]]:
        """The batches of worker `wid` of `nw` (wid=0, nw=1: this rank's epoch, in order)."""
        return (batch for unit in self.worker_units(wid, nw) for batch in unit)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        """Units, not batches (see `worker_units`; ShardLoader flattens them)."""
        info = get_worker_info()
        return self.worker_units(*((info.id, info.num_workers) if info is not None else (0, 1)))


def _check_position(p: int, raw: dict[str, Any], keys: Sequence[str]) -> None:
    """The stream must hold the keys the shard indexes planned (else shards changed)."""
    if p >= len(keys) or raw["__key__"] != keys[p]:
        want = keys[p] if p < len(keys) else None
        raise DataError(
            str(raw.get("__url__")),
            str(raw.get("__key__")),
            f"stream position {p} should be {want!r} (shards changed after indexing)",
        )


def _buffer_shuffle(stream: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    buf: list[Any] = []
    for x in stream:
        if len(buf) < size:
            buf.append(x)
            continue
        j = int(rng.integers(size))
        buf[j], x = x, buf[j]
        yield x
    for j in rng.permutation(len(buf)):
        yield buf[j]


class ShardLoader:
    """Iterable over collated batches (dicts, layout in schema.py) for one rank."""

    def __init__(self, dataset: ShardDataset, num_workers: int = 0) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset, self.num_workers = dataset, num_workers

    @property
    def num_samples(self) -> int:
        """Samples this rank reads in the epoch (before the resume position)."""
        return self.dataset.plan.count

    @property
    def full_batches(self) -> int:
        """Full batches this rank yields in the epoch (what `endless_batches` takes per epoch).

        A mix: exact, from the annotation-only plan. One task: num_samples // batch_size
        (exact when every sample has the task and expand is off).
        """
        return self.dataset.full_batches

    @property
    def rank_items(self) -> list[dict[str, int]]:
        """A mix: items drawn per task on every rank this epoch (leftovers included)."""
        return self.dataset.rank_items

    @property
    def no_task(self) -> int:
        """A mix: samples of this rank's epoch that have none of the mix tasks (skipped)."""
        return self.dataset.mix.no_task if self.dataset.mix is not None else 0

    @property
    def skipped(self) -> int:
        """Samples/shards skipped with on_error='skip' (this process; workers log theirs)."""
        return self.dataset.skipped

    def set_epoch(self, epoch: int, start_sample: int = 0, start_batch: int = 0) -> None:
        self.dataset.set_epoch(epoch)
        _set_start(self.dataset, start_sample, start_batch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.num_workers == 0:
            return self.dataset.iter_worker(0, 1)
        if self.num_workers > 1 and self.dataset.mix is None:
            for path, _ in self.dataset.plan.shards:
                index_shard(path)  # once here: forked workers inherit the cached indexes
        loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False
        )
        return (batch for unit in loader for batch in unit)


def _set_start(ds: ShardDataset, start_sample: int, start_batch: int) -> None:
    """A mix resumes by batches; one task by samples (start_batch counts batch_size each)."""
    if start_sample < 0:
        raise ValueError(f"start_sample must be >= 0, got {start_sample}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    if start_sample and start_batch:
        raise ValueError("give start_sample or start_batch, not both")
    if ds.mix is not None:
        if start_sample:
            raise ValueError(
                "start_sample: a task mix (or one task with expand) resumes by batches; "
                "give start_batch"
            )
        ds.start_sample, ds.start_batch = 0, start_batch
    else:
        ds.start_sample, ds.start_batch = start_sample or start_batch * ds.cfg.batch_size, 0


def make_loader(
    shard_dir: str | Path,
    split: str,
    task: str,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    epoch: int = 0,
    start_sample: int = 0,
    start_batch: int = 0,
    on_error: str = "raise",
    image_size: int | None = None,
    shuffle: bool = True,
    shuffle_buffer: int = 256,
    expand: bool = False,
    even: bool = True,
    mix_weights: dict[str, float] | None = None,
    split_mode: str = "auto",
) -> ShardLoader:
    """Batches of one task view ("caption", "vqa", ..., or "mix") for `rank` of `world_size`.

    Resume inside `epoch` with `start_batch` = batches this rank already consumed (any
    task), or, for one task, `start_sample` = samples already consumed; the resumed stream
    equals the tail of the uninterrupted one.
    """
    if start_sample < 0:
        raise ValueError(f"start_sample must be >= 0, got {start_sample}")
    cfg = DataConfig(
        shard_dir=str(shard_dir), split=split, task=task, batch_size=batch_size,
        num_workers=num_workers, seed=seed, epoch=epoch, image_size=image_size,
        on_error=on_error, shuffle=shuffle, shuffle_buffer=shuffle_buffer, expand=expand,
        even=even, mix_weights=dict(mix_weights or {}),
    )  # fmt: skip
    ds = ShardDataset(cfg, rank=rank, world_size=world_size, split_mode=split_mode)
    _set_start(ds, start_sample, start_batch)
    return ShardLoader(ds, num_workers=num_workers)


def loader_from_config(
    cfg: DataConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    start_sample: int = 0,
    start_batch: int = 0,
) -> ShardLoader:
    """make_loader from a DataConfig (Hydra)."""
    return make_loader(
        cfg.shard_dir, cfg.split, cfg.task, cfg.batch_size, rank=rank, world_size=world_size,
        num_workers=cfg.num_workers, seed=cfg.seed, epoch=cfg.epoch, start_sample=start_sample,
        start_batch=start_batch, on_error=cfg.on_error, image_size=cfg.image_size,
        shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer, expand=cfg.expand, even=cfg.even,
        mix_weights=cfg.mix_weights or None,
    )  # fmt: skip
