"""Capture and restore every RNG a step can touch, so a resumed run replays exactly.

On disk the state is a safetensors file (tensors plus a JSON header of scalars): loading it
runs no code, unlike a pickle, so a crafted file in a run directory cannot execute anything.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from setok_tokenizer.atomic import atomic_write_with

RNG_FORMAT = "setokim-rng-1"


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The current state of all RNGs of this process."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA only when both sides have it)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng_file(path: Path) -> None:
    """Write this process's RNG state to `path` (safetensors, atomically)."""
    state = rng_state()
    py_version, py_internal, py_gauss = state["python"]
    np_name, np_keys, np_pos, np_has_gauss, np_cached = state["numpy"]
    tensors = {
        "python": torch.tensor(py_internal, dtype=torch.int64),
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "torch": state["torch"].clone(),
    }
    for i, cuda in enumerate(state.get("cuda", [])):
        tensors[f"cuda.{i}"] = cuda.cpu().clone()
    scalars = {
        "python_version": py_version,
        "python_gauss": py_gauss,
        "numpy_name": np_name,
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_cached_gaussian": float(np_cached),
        "cuda_devices": len(state.get("cuda", [])),
    }
    meta = {"format": RNG_FORMAT, "scalars": json.dumps(scalars)}
    atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_rng_file(path: Path) -> dict[str, Any]:
    """Read a `save_rng_file` file into the form `set_rng_state` takes.

    Anything else (a pickle, a truncated file, missing entries) is a ValueError naming the
    path; nothing in the file is ever executed.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != RNG_FORMAT:
                raise ValueError(f"format tag is {meta.get('format')!r}, not {RNG_FORMAT!r}")
            scalars = json.loads(meta["scalars"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        python = tensors["python"]
        numpy_keys = tensors["numpy"]
        if python.shape != (625,) or numpy_keys.shape != (624,):
            raise ValueError("python/numpy state tensors have the wrong shape")
        gauss = scalars["python_gauss"]
        state: dict[str, Any] = {
            "python": (
                int(scalars["python_version"]),
                tuple(int(v) for v in python.tolist()),
                None if gauss is None else float(gauss),
            ),
            "numpy": (
                str(scalars["numpy_name"]),
                numpy_keys.numpy().astype(np.uint32),
                int(scalars["numpy_pos"]),
                int(scalars["numpy_has_gauss"]),
                float(scalars["numpy_cached_gaussian"]),
            ),
            "torch": tensors["torch"],
        }
        devices = int(scalars["cuda_devices"])
        if devices:
            state["cuda"] = [tensors[f"cuda.{i}"] for i in range(devices)]
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"rng state file {path} is not a valid RNG state file: {err}") from err
    return state
