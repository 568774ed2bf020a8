"""What every training stage shares, written once.

Config defaults (the tiny tokenizer, a stage's Shapes World data), Shapes World generation
on rank 0 when `data.shard_dir` has no dataset, and the resumable endless-epoch micro-batch stream over `setokim.data.make_loader`. Imports stay
light (the toy stage uses this module and must not pull in the tokenizer stack).
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from setok_tokenizer.config import SeTokConfig, from_dict
from setokim.data.config import DataConfig
from setokim.data.shapes_world import World

log = logging.getLogger("setokim.stages")


# ---- config ------------------------------------------------------------------------------------
def tiny_tokenizer() -> SeTokConfig:
    """The tiny seeded tokenizer a stage builds when the experiment gives no other (CPU runs)."""
    return from_dict(SeTokConfig, {"clustering": {"max_clusters": 8}, "merger": {"num_blocks": 1}})


def shapes_data(shard_dir: str, task: str, *mix: str) -> DataConfig:
    """A stage's default data: Shapes World in `shard_dir`, one task or an even `mix`."""
    return DataConfig(shard_dir=shard_dir, task=task, mix_weights=dict.fromkeys(mix, 1.0))


@dataclass
class GenerateFields:
    """The Shapes World dataset a stage writes into data.shard_dir when it holds none
    (`prepare_data`); every stage config that reads data has these fields."""

    generate_if_missing: bool = True
    generate_train: int = 256
    generate_image_size: int = 64
    generate_seed: int = 0


def describe_config(name: str, cfg: Any, **resolved: Any) -> dict[str, Any]:
    """trainer.json's stage entry: the resolved sub-configs, then the stage's other fields."""
    rest = {k: v for k, v in asdict(cfg).items() if k not in resolved}
    return {"name": name, **{k: asdict(v) for k, v in resolved.items()}, **rest}


# ---- runtime -----------------------------------------------------------------------------------
def is_main() -> bool:
    """Rank 0 (from the process group, or RANK before one exists)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def set_cpu_threads(threads: int | None) -> None:
    """torch.set_num_threads on CPU-only hosts; None leaves torch's default."""
    if threads is not None and not torch.cuda.is_available():
        torch.set_num_threads(threads)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad (what the optimizer gets)."""
    return [p for p in model.parameters() if p.requires_grad]


# ---- data --------------------------------------------------------------------------------------
def ensure_dataset(
    shard_dir: str | os.PathLike[str],
    *,
    train: int,
    image_size: int,
    seed: int,
    test: int = 8,
    world: World | None = None,
) -> Path:
    """Generate a Shapes World dataset into `shard_dir` unless it has a manifest already.

    Written to a sibling temp dir and renamed, so concurrent jobs or a kill never leave a
    half-written dataset behind (the loser of a race discards its copy). A generated dataset
    already there must be of the same `world`: another one is refused, not silently reused.
    """
    from setokim.data import generate_dataset

    world = world or World()
    target = Path(shard_dir)
    if (target / "manifest.json").is_file():
        check_world(target, world)
        return target
    if target.exists() and any(target.iterdir()):
        raise FileNotFoundError(
            f"data.shard_dir: {target} exists but has no manifest.json; not overwriting it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        generate_dataset(
            tmp, train=train, val=8, test=test, image_size=image_size, seed=seed, world=world
        )
        if target.exists():
            target.rmdir()  # empty (checked above)
        os.rename(tmp, target)
    except OSError:
        if not (target / "manifest.json").is_file():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def check_world(shard_dir: Path, world: World) -> None:
    """Refuse a generated Shapes World in `shard_dir` whose manifest records another world.

    Manifests written before worlds were recorded hold the default world (with their
    `max_objects`); converted datasets (another `source`) are not checked.
    """
    from setokim.data import read_manifest

    info = read_manifest(shard_dir).get("info", {})
    if info.get("source", "shapes_world") != "shapes_world":
        return
    recorded = info.get("world") or World(max_objects=int(info.get("max_objects", 8))).as_dict()
    if recorded != world.as_dict():
        raise ValueError(
            f"data.world: {shard_dir} holds a Shapes World generated with {recorded}, the "
            f"config asks for {world.as_dict()}; point data.shard_dir elsewhere or delete it"
        )


def prepare_data(data: DataConfig, rank: int, gen: GenerateFields) -> None:
    """Rank 0 generates Shapes World into data.shard_dir when it has no manifest; all wait.

    With data.generate, an existing generated dataset must be of data.world.
    """
    shard_dir = Path(data.shard_dir)
    if rank == 0 and not (shard_dir / "manifest.json").is_file():
        if not gen.generate_if_missing:
            raise FileNotFoundError(
                f"data.shard_dir: no manifest.json in {shard_dir} and generate_if_missing=false"
            )
        ensure_dataset(
            shard_dir,
            train=gen.generate_train,
            image_size=gen.generate_image_size,
            seed=gen.generate_seed,
            world=data.world,
        )
    elif rank == 0 and gen.generate_if_missing:
        check_world(shard_dir, data.world)
    if dist.is_initialized():
        dist.barrier()


def endless_batches(
    data: DataConfig, rank: int, world_size: int, start_step: int, micro_batch_size: int
) -> Iterator[dict[str, Any]]:
    """Endless epochs of full micro-batches; the last partial batch of an epoch is dropped.

    Position p (micro-batches done on this rank) -> (epoch, batches done in it) from each
    epoch's exact `full_batches` (one task: samples // micro_batch_size, the same every
    epoch; a task mix: from its annotation-only plan, which differs from epoch to epoch, so
    resuming walks the plans of the epochs before: one pass over the annotations per epoch,
    no image read). The loader then skips that many batches, so the stream resumed at
    `start_step` equals the tail of the uninterrupted one. data.batch_size is ignored.
    Should a loader end before its count (one task over samples that lack it, or samples
    skipped with on_error="skip"), the stream logs it and rolls over to the next epoch
    instead of ending; resume is then exact only up to that epoch.
    """
    from setokim.data import make_loader

    d = data
    loader = make_loader(
        d.shard_dir, d.split, d.task, micro_batch_size, rank=rank, world_size=world_size,
        num_workers=d.num_workers, seed=d.seed, epoch=d.epoch, on_error=d.on_error,
        image_size=d.image_size, shuffle=d.shuffle, shuffle_buffer=d.shuffle_buffer,
        expand=d.expand, even=True, mix_weights=d.mix_weights or None,
    )  # fmt: skip
    if loader.full_batches == 0:
        raise ValueError(
            f"data: split {d.split!r} of {d.shard_dir} gives no full micro-batch of "
            f"{micro_batch_size} per rank in epoch {d.epoch} ({loader.num_samples} samples "
            f"per rank{', task mix' if d.task == 'mix' else ''}{', expand' if d.expand else ''})"
        )
    epoch, within = d.epoch, start_step
    if loader.dataset.mix is None:  # one task without expand: the same count every epoch
        epoch, within = epoch + within // loader.full_batches, within % loader.full_batches
    else:
        while within >= loader.full_batches:
            within -= loader.full_batches
            epoch += 1
            loader.set_epoch(epoch)
            if loader.full_batches == 0:
                raise ValueError(f"data: epoch {epoch} of the task mix gives no full micro-batch")
    while True:
        loader.set_epoch(epoch, start_batch=within)
        want, got = loader.full_batches - within, 0
        for batch in itertools.islice(iter(loader), want):
            got += 1
            yield batch
        if got < want:
            log.warning(
                "data: epoch %d on rank %d gave %d of %d micro-batches; next epoch",
                epoch, rank, got + within, loader.full_batches,
            )  # fmt: skip
        epoch, within = epoch + 1, 0


def epoch_batches(
    data: DataConfig, rank: int, world_size: int, micro_batch_size: int, gen: GenerateFields
) -> int:
    """Full micro-batches each rank reads in one epoch of `endless_batches` over `data` (the
    first, `data.epoch`; TrainerConfig.epochs). The data is generated first when missing.

    The loader's `full_batches` for this rank, which is every rank's count: with `even`
    (as `endless_batches` asks) one task keeps the smallest rank's samples, and a task mix
    keeps the smallest rank's batches (its annotation-only plan covers every rank; no
    image is read), so all ranks derive the same max_steps.
    """
    from setokim.data import make_loader

    prepare_data(data, rank, gen)
    loader = make_loader(
        data.shard_dir, data.split, data.task, micro_batch_size, rank=rank,
        world_size=world_size, seed=data.seed, epoch=data.epoch, shuffle=data.shuffle,
        shuffle_buffer=data.shuffle_buffer, expand=data.expand, even=True,
        mix_weights=data.mix_weights or None,
    )  # fmt: skip
    return loader.full_batches


__all__ = [
    "GenerateFields",
    "describe_config",
    "endless_batches",
    "ensure_dataset",
    "epoch_batches",
    "is_main",
    "prepare_data",
    "set_cpu_threads",
    "shapes_data",
    "tiny_tokenizer",
    "trainable_parameters",
]


def copy_with_clustering(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    clustering: dict[str, Any],
    configs: tuple[tuple[str, tuple[str, ...]], ...],
) -> Path:
    """A copy of an export whose SeTok clusters another way (same weights): Table 9's SeTok in
    a patch model, or a patch-token model on a SeTok's encoder. `configs` lists each JSON file
    (relative to the export) and the keys down to the tokenizer config whose `clustering`
    changes. Written to a temporary sibling and renamed, so `dst` is whole or absent; an
    existing `dst` is kept (a resumed run)."""
    import json

    target = Path(dst)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shutil.copytree(src, tmp / "export")
        for rel, keys in configs:
            path = tmp / "export" / rel
            if not path.is_file():
                raise FileNotFoundError(f"{src}: no {rel} (not the export expected)")
            data = json.loads(path.read_text(encoding="utf-8"))
            node = data
            for key in keys:
                node = node[key]
            node["clustering"] = {**node["clustering"], **clustering}
            path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp / "export", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
