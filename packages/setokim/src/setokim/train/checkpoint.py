"""Atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout under `<run_dir>/checkpoints/`:
    step_00000010/         DCP shards of {"model", "optim"} + trainer_state.json
                           + rng_rank<r>.pt (one per rank)
    latest                 text file naming the newest complete step directory
A step directory is written as `step_N.tmp` and renamed only when every rank finished, and
`latest` is replaced atomically after that, so a kill at any moment leaves the previous
checkpoint intact. DCP reshards on load, so a 2-rank checkpoint loads on 1 rank.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from setokim.train.rng import rng_state, seed_all, set_rng_state
from setokim.utils.io import atomic_write_json, atomic_write_text

STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Everything besides model/optimizer weights needed to continue a run exactly."""

    step: int
    data_position: int  # micro-batches consumed per rank
    skipped_steps: int
    nonfinite_in_row: int
    world_size: int
    scheduler: dict[str, Any]


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it assumes one process when no group exists; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The step directory named by `latest`, or None when the run has no checkpoint yet."""
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not STEP_DIR.match(name) or not (path / STATE_FILE).is_file():
        raise RuntimeError(f"run_dir: {pointer} names {name!r}, which is not a complete checkpoint")
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step directories, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    keep_last: int,
) -> Path:
    """Collective: every rank calls it. Returns the final step directory."""
    root = checkpoint_root(run_dir)
    final = root / step_dir_name(state.step)
    tmp = root / (step_dir_name(state.step) + ".tmp")
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of a save that was killed half-way
        tmp.mkdir()
    _barrier()

    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _quiet_single_process():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        atomic_write_json(tmp / STATE_FILE, state.__dict__)
    _barrier()

    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        atomic_write_text(root / "latest", final.name + "\n")
        for old in list_checkpoints(run_dir)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, seed: int
) -> TrainerState:
    """Collective: load weights + optimizer (resharding as needed) and this rank's RNG.

    A rank that has no RNG file of its own (the job grew) is re-seeded from (seed, rank, step).
    """
    path = Path(path)
    state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    bundle = {"model": model_sd, "optim": optim_sd}
    with _quiet_single_process():
        dcp.load(bundle, checkpoint_id=path)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=bundle["model"],
        optim_state_dict=bundle["optim"],
    )
    rank = _rank()
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        seed_all(seed + 1_000_003 * rank + state.step)
    return state


def load_model_state(path: Path, model: nn.Module) -> nn.Module:
    """Load only the model weights of a step directory (any world size) into `model`.

    For evaluation and tests: no optimizer, no RNG. Works without a process group.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"path: {path} is not a complete checkpoint directory")
    bundle = {"model": model.state_dict()}
    with _quiet_single_process():
        dcp.load(bundle, checkpoint_id=path)
    model.load_state_dict(bundle["model"])
    return model
