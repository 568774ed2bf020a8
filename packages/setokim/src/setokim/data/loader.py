"""One loader for every task view over webdataset shards.

Order of an epoch (the same on every rank, so ranks agree without talking):
1. shards in a permutation seeded by (seed, epoch) (manifest order if shuffle=False);
2. split by rank: whole shards round-robin when there are at least `world_size` shards
   ("shard" mode), else every rank reads all shards and keeps stream position p with
   p % world_size == rank ("sample" mode); either way no sample goes to two ranks;
3. a seeded shuffle buffer per rank on the raw (undecoded) samples;
4. with `even`, every rank keeps the same count (the smallest rank's, from the manifest);
5. the first `start_sample` samples are skipped undecoded (resume);
6. the rest is cut into chunks of `batch_size`; DataLoader worker w decodes chunks
   c % num_workers == w, and torch's DataLoader returns them round-robin, so the batch
   order does not depend on num_workers.

Errors: a shard that cannot be read, holds fewer samples than the manifest says, or a sample
that cannot be decoded raises DataError naming the shard and key (on_error="raise"), or is
logged and counted (on_error="skip").
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from setokim.data.collate import collate
from setokim.data.config import DataConfig
from setokim.data.decode import DataError, decode_sample
from setokim.data.schema import TASKS
from setokim.data.shards import read_manifest
from setokim.data.views import items_for

log = logging.getLogger("setokim.data")

DEFAULT_MIX = {t: 1.0 for t in TASKS if t != "chat"}


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


class ShardDataset(IterableDataset):
    """Yields collated batches of one rank; see the module docstring for the order."""

    def __init__(
        self, cfg: DataConfig, rank: int = 0, world_size: int = 1, split_mode: str = "auto"
    ) -> None:
        super().__init__()
        if cfg.task not in (*TASKS, "mix"):
            raise ValueError(f"task must be one of {(*TASKS, 'mix')}, got {cfg.task!r}")
        if cfg.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {cfg.on_error!r}")
        if cfg.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
        self.cfg = cfg
        self.rank, self.world_size, self.split_mode = rank, world_size, split_mode
        self.start_sample = 0
        self.skipped = 0
        weights = cfg.mix_weights or DEFAULT_MIX
        for t, w in weights.items():
            if t not in TASKS or w < 0:
                raise ValueError(f"mix_weights: {t!r}={w} (tasks {TASKS}, weights >= 0)")
        total = sum(weights.values())
        if cfg.task == "mix" and total <= 0:
            raise ValueError("mix_weights must have a positive weight")
        self.mix_tasks = list(weights)
        self.mix_p = np.asarray([weights[t] / total for t in self.mix_tasks]) if total > 0 else None
        self.plan = self._plan()

    def _plan(self) -> RankPlan:
        c = self.cfg
        return plan_rank(
            c.shard_dir, c.split, self.rank, self.world_size,
            seed=c.seed, epoch=c.epoch, shuffle=c.shuffle, even=c.even, split_mode=self.split_mode,
        )  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        self.cfg.epoch = epoch
        self.plan = self._plan()

    def _fail(self, err: DataError) -> None:
        if self.cfg.on_error == "raise":
            raise err
        self.skipped += 1
        log.warning("skipping (%d so far): %s", self.skipped, err)

    def _read_shard(self, path: Path, expected: int) -> Iterator[dict[str, Any]]:
        n, last = 0, None
        try:
            for raw in group_by_keys(tar_file_expander(url_opener([{"url": str(path)}]))):
                n, last = n + 1, raw["__key__"]
                raw["__url__"] = path.name
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

    def raw_stream(self) -> Iterator[dict[str, Any]]:
        """Steps 1-4: this rank's undecoded samples in epoch order (exactly plan.count)."""
        c, plan = self.cfg, self.plan
        stream: Iterator[dict[str, Any]] = (
            raw for path, n in plan.shards for raw in self._read_shard(path, n)
        )
        if plan.mode == "sample":
            stream = (raw for p, raw in enumerate(stream) if p % self.world_size == self.rank)
        if c.shuffle and c.shuffle_buffer > 1:
            stream = _buffer_shuffle(
                stream, c.shuffle_buffer, np.random.default_rng([c.seed, c.epoch, self.rank, 7])
            )
        for p, raw in enumerate(stream):
            if p >= plan.count:
                return
            yield raw

    def __len__(self) -> int:
        """Batches this rank yields from start_sample (exact when every sample has the task)."""
        left = max(0, self.plan.count - self.start_sample)
        return -(-left // self.cfg.batch_size)

    def _chunk_task(self, chunk: int) -> str:
        if self.cfg.task != "mix":
            return self.cfg.task
        rng = np.random.default_rng([self.cfg.seed, self.cfg.epoch, self.rank, chunk, 11])
        return self.mix_tasks[int(rng.choice(len(self.mix_tasks), p=self.mix_p))]

    def _batches(self, chunk: int, raws: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        c = self.cfg
        task = self._chunk_task(chunk)
        items: list[dict[str, Any]] = []
        for raw in raws:
            try:
                d = decode_sample(raw, c.image_size)
                items.extend(items_for(d, task, seed=c.seed, epoch=c.epoch, expand=c.expand))
            except DataError as err:
                self._fail(err)
            except Exception as exc:  # noqa: BLE001 - bad annotations name shard and key
                self._fail(
                    DataError(
                        str(raw.get("__url__")),
                        str(raw.get("__key__")),
                        f"{type(exc).__name__}: {exc}",
                    )
                )
        for i in range(0, len(items), c.batch_size):
            yield collate(items[i : i + c.batch_size], task)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        bsz, chunk, buf = self.cfg.batch_size, 0, []
        for p, raw in enumerate(self.raw_stream()):
            if p < self.start_sample:
                continue
            if chunk % nw == wid:
                buf.append(raw)
            if (p - self.start_sample + 1) % bsz == 0:
                if buf:
                    yield from self._batches(chunk, buf)
                chunk, buf = chunk + 1, []
        if buf:
            yield from self._batches(chunk, buf)


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
        """Samples this rank reads in the epoch (before start_sample)."""
        return self.dataset.plan.count

    @property
    def skipped(self) -> int:
        """Samples/shards skipped with on_error='skip' (this process; workers log theirs)."""
        return self.dataset.skipped

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        self.dataset.set_epoch(epoch)
        self.dataset.start_sample = start_sample

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.num_workers == 0:
            return iter(self.dataset)
        loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False
        )
        return iter(loader)


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

    `start_sample` = samples this rank already consumed in `epoch` (e.g. micro-batches
    done x batch_size); the resumed stream equals the tail of the uninterrupted one.
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
    ds.start_sample = start_sample
    return ShardLoader(ds, num_workers=num_workers)


def loader_from_config(
    cfg: DataConfig, *, rank: int = 0, world_size: int = 1, start_sample: int = 0
) -> ShardLoader:
    """make_loader from a DataConfig (Hydra)."""
    return make_loader(
        cfg.shard_dir, cfg.split, cfg.task, cfg.batch_size, rank=rank, world_size=world_size,
        num_workers=cfg.num_workers, seed=cfg.seed, epoch=cfg.epoch, start_sample=start_sample,
        on_error=cfg.on_error, image_size=cfg.image_size, shuffle=cfg.shuffle,
        shuffle_buffer=cfg.shuffle_buffer, expand=cfg.expand, even=cfg.even,
        mix_weights=cfg.mix_weights or None,
    )  # fmt: skip
