"""Sharded exports: written by every rank, resumable when killed, loaded per rank's shard.

A 7B/13B export written by rank 0 alone holds the whole model in one process's memory and
one file; loading it on every rank of a Stage III job builds the whole model once per rank
(about 60 GB of host memory per rank for 13B). Here:

Writing (`write_sharded_export`, collective): the weights are split over the ranks by size
(`assign_shards`); each rank materialises only its own tensors (`materialise(names)`: e.g.
read from a DCP checkpoint) and writes `model-0000r-of-0000W.safetensors` atomically in the
staging folder `<out>.partial/`, then records the shard's SHA-256 in
`.progress/<shard>.json`. Rank 0 writes the index (`model.safetensors.index.json`, the
transformers layout), `fill(staging)` adds the rest (config, tokenizer...), the manifest of
every file's size and SHA-256 is written (shared over ranks), and the folder is renamed to
`<out>`. A job killed half-way leaves `<out>.partial/`; the relaunch keeps every shard
whose recorded SHA-256 still matches and writes only the missing ones.

From a trainer checkpoint (`export_checkpoint_weights`): each rank reads from the DCP
checkpoint only the tensors of its own shard, so no rank builds the model.

Loading (`load_sharded_weights`): the model is built on the meta device and sharded
(FSDP2 `fully_shard`, then `to_empty`), so each rank's parameters are DTensors holding only
its local shard; each one is filled from the safetensors slice of its rows
(`safe_open(...).get_slice`), so a rank reads and materialises about 1/world of the
weights. Plain (unsharded) tensors are read whole. Returns the bytes this rank read.

A SeTokIM export (Stage III's start): `load_export_on_meta` builds the model with its LLM on
the meta device and loads the rest (the loader `SeTokIM.from_pretrained` uses); with
`defer_llm` the LLM stays there until the training loop has sharded it, and
`materialise_from_export` then allocates only the meta tensors (the LoRA adapters, SeTok
and projector keep their values) and fills each rank's rows.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn

from setokim.utils.io import atomic_write_json

INDEX_FILE = "model.safetensors.index.json"
PROGRESS_DIR = ".progress"
PARTIAL_SUFFIX = ".partial"
LLM_PREFIX = "llm."  # SeTokIM's LLM: what `load_export_on_meta(defer_llm=True)` leaves on meta


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shard_name(index: int, count: int) -> str:
    """The transformers name of shard `index` (0-based) of `count`."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def assign_shards(sizes: Mapping[str, int], count: int) -> list[list[str]]:
    """Tensor names split into `count` groups of about equal bytes (largest first to the
    lightest group; ties by name), the same on every rank."""
    if count < 1:
        raise ValueError(f"count: must be >= 1, got {count}")
    groups: list[list[str]] = [[] for _ in range(count)]
    loads = [0] * count
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        light = min(range(count), key=lambda i: (loads[i], i))
        groups[light].append(name)
        loads[light] += sizes[name]
    return [sorted(g) for g in groups]


def _shard_done(staging: Path, name: str) -> bool:
    """A shard of an earlier, killed try that is complete and unchanged."""
    from setokim.train.checkpoint import file_digest

    record, shard = staging / PROGRESS_DIR / f"{name}.json", staging / name
    if not record.is_file() or not shard.is_file():
        return False
    try:
        want = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return file_digest(shard) == want


def write_sharded_export(
    out: str | os.PathLike[str],
    sizes: Mapping[str, int],
    materialise: Callable[[list[str]], Mapping[str, Tensor]],
    fill: Callable[[Path], None] | None = None,
) -> Path:
    """Collective: every rank writes its share of the weights named in `sizes` (bytes per
    tensor) into `out` (see the module docstring). `materialise(names)` returns this
    rank's tensors; `fill(staging)` runs on rank 0 to add the export's other files.
    Returns `out`; an existing `out` is an error (exports are not overwritten)."""
    from safetensors.torch import save_file

    from setok_tokenizer.atomic import atomic_write_with
    from setokim.train.checkpoint import file_digest, write_manifest

    out = Path(out)
    rank, world = _rank_world()
    if out.exists():
        raise FileExistsError(f"export {out} exists; exports are written once")
    staging = out.with_name(out.name + PARTIAL_SUFFIX)
    if rank == 0:
        (staging / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
        for debris in staging.rglob("*.tmp"):  # a write cut off by the kill
            debris.unlink()
    _barrier()
    groups = assign_shards(sizes, world)
    mine = shard_name(rank, world)
    if not _shard_done(staging, mine):
        tensors = {k: v.detach().contiguous().cpu() for k, v in materialise(groups[rank]).items()}
        if set(tensors) != set(groups[rank]):
            raise ValueError(
                f"materialise returned {sorted(set(tensors) ^ set(groups[rank]))[:5]} "
                f"instead of rank {rank}'s tensors"
            )
        atomic_write_with(staging / mine, lambda tmp: save_file(tensors, tmp))
        del tensors
        atomic_write_json(staging / PROGRESS_DIR / f"{mine}.json", file_digest(staging / mine))
    _barrier()
    if rank == 0:
        weight_map = {n: shard_name(r, world) for r, g in enumerate(groups) for n in g}
        index = {"metadata": {"total_size": int(sum(sizes.values()))}, "weight_map": weight_map}
        atomic_write_json(staging / INDEX_FILE, index)
        if fill is not None:
            fill(staging)
        shutil.rmtree(staging / PROGRESS_DIR)
    _barrier()
    write_manifest(staging, step=0)
    _barrier()
    if rank == 0:
        os.replace(staging, out)
    _barrier()
    return out


def checkpoint_tensors(step_dir: str | os.PathLike[str], prefix: str = "model.") -> dict[str, Any]:
    """name (without `prefix`) -> DCP tensor metadata (size, dtype) of a checkpoint's model
    entries; read from DCP's `.metadata` through the allow-list reader, no tensor read."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from setokim.train.checkpoint import SafeFileSystemReader

    meta = SafeFileSystemReader(Path(step_dir)).read_metadata().state_dict_metadata
    return {
        k[len(prefix) :]: v
        for k, v in meta.items()
        if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)
    }


def export_checkpoint_weights(
    step_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    exclude: tuple[str, ...] = (),
    fill: Callable[[Path], None] | None = None,
) -> Path:
    """Collective: a trainer checkpoint's model weights as a sharded export written by every
    rank. Each rank reads from the DCP checkpoint only the tensors of its own shard (DCP
    reads any subset; no model is built), cast to `dtype` when given (floating tensors);
    names starting with one of `exclude` are left out (frozen modules an export stores
    elsewhere). A killed export resumes (`write_sharded_export`)."""
    from setokim.train.checkpoint import SafeFileSystemReader, SafeLoadPlanner

    step_dir = Path(step_dir)
    entries = {k: v for k, v in checkpoint_tensors(step_dir).items() if not k.startswith(exclude)}

    def out_dtype(meta: Any) -> torch.dtype:
        stored = meta.properties.dtype
        return dtype if dtype is not None and stored.is_floating_point else stored

    sizes = {
        k: int(torch.Size(v.size).numel()) * torch.empty((), dtype=out_dtype(v)).element_size()
        for k, v in entries.items()
    }

    def materialise(names: list[str]) -> dict[str, Tensor]:
        bundle = {
            "model": {
                n: torch.empty(entries[n].size, dtype=entries[n].properties.dtype) for n in names
            }
        }
        # no_dist: each rank reads its own names, also when the others skip (resumed shards)
        dcp.load(bundle, storage_reader=SafeFileSystemReader(step_dir),
                 planner=SafeLoadPlanner(), no_dist=True)  # fmt: skip
        return {n: t.to(out_dtype(entries[n])) for n, t in bundle["model"].items()}

    return write_sharded_export(out, sizes, materialise, fill)


def read_index(export: str | os.PathLike[str]) -> dict[str, str]:
    """tensor name -> shard file of a sharded export (errors name the folder)."""
    path = Path(export) / INDEX_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        return dict(index["weight_map"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise FileNotFoundError(f"{export}: not a sharded export ({INDEX_FILE}: {err})") from err


def _local_rows(param: Any) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(local shape, global offset) of a DTensor's shard, None for a plain tensor."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        return None
    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    return tuple(shape), tuple(offset)


def load_sharded_weights(
    model: nn.Module, export: str | os.PathLike[str], *, strict: bool = True
) -> int:
    """Fill `model`'s parameters and buffers from a sharded export, reading for each
    DTensor only its local rows. Returns the bytes this rank read.

    `strict`: every tensor of the model's state dict must be in the export (else an error
    naming the first missing ones); tensors of the export the model does not have are
    ignored. Non-persistent buffers are not in an export: a model built on the meta device
    must compute them itself after `to_empty` (a Llama's rotary `inv_freq`).
    """
    export = Path(export)
    where = read_index(export)
    saved = set(model.state_dict())  # no non-persistent buffers (e.g. rotary inv_freq)
    targets = {n: t for n, t in model.named_parameters() if n in saved}
    targets.update({n: t for n, t in model.named_buffers() if n in saved})
    missing = sorted(n for n in targets if n not in where)
    if strict and missing:
        raise KeyError(f"{export}: the export lacks {missing[:5]} ({len(missing)} tensors)")
    return _fill_rows({n: (n, t) for n, t in targets.items() if n in where}, export, where)


def _fill_rows(
    targets: Mapping[str, tuple[str, Tensor]], export: Path, where: Mapping[str, str]
) -> int:
    """Copy into each target (model name -> (export name, tensor)) its rows of the export
    (`where`: export name -> file): a DTensor's local rows only, a plain tensor whole.
    Returns the bytes read; a shape that does not fit is an error naming the tensor."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name, (key, _) in targets.items():
        by_file.setdefault(where[key], []).append(name)
    read = 0
    with torch.no_grad():
        for file, names in sorted(by_file.items()):
            with safe_open(str(export / file), framework="pt") as handle:
                for name in names:
                    key, target = targets[name]
                    rows = _local_rows(target)
                    local = target.to_local() if rows is not None else target
                    stored = tuple(handle.get_slice(key).get_shape())
                    if stored != tuple(target.shape):
                        raise ValueError(
                            f"{export / file}: {key} has shape {stored}, the model's {name} "
                            f"{tuple(target.shape)}"
                        )
                    if rows is None:
                        value = handle.get_tensor(key)
                    else:
                        shape, offset = rows
                        if local.numel() == 0:
                            continue
                        index = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
                        value = handle.get_slice(key)[index]
                    if tuple(value.shape) != tuple(local.shape):
                        raise ValueError(
                            f"{export / file}: {key} gives rows of shape {tuple(value.shape)}, "
                            f"the model's (local) {name} {tuple(local.shape)}"
                        )
                    local.copy_(value)
                    read += value.numel() * value.element_size()
    return read


def export_weight_files(export: str | os.PathLike[str]) -> dict[str, str]:
    """tensor name -> file of a full SeTokIM export's weights: the transformers index of a
    sharded export, else every tensor of its single `model.safetensors`."""
    from safetensors import safe_open

    from setokim.model.export import WEIGHTS_FILE

    export = Path(export)
    if (export / INDEX_FILE).is_file():
        return read_index(export)
    if not (export / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{export}: neither {INDEX_FILE} nor {WEIGHTS_FILE} (no weights)")
    with safe_open(str(export / WEIGHTS_FILE), framework="pt") as handle:
        return dict.fromkeys(handle.keys(), WEIGHTS_FILE)  # noqa: SIM118


def materialise_buffers(llm: nn.Module, device: torch.device | str) -> None:
    """Compute on `device` the non-persistent buffers a meta-built transformers model lacks (a
    rotary embedding's `inv_freq`: not in any export) with the model's own initialiser."""
    for name, module in llm.named_modules():
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            raise RuntimeError(f"{name}: has meta buffers next to parameters; cannot rebuild them")
        module.to_empty(device=device, recurse=False)
        llm._init_weights(module)  # type: ignore[operator]


def load_export_on_meta(
    directory: str | os.PathLike[str], *, defer_llm: bool = False, **parts: Any
) -> Any:
    """A full SeTokIM export (Stage II) on the CPU with its LLM built on the meta device and
    given the export's tensors (`export.load_full`, as `SeTokIM.from_pretrained` loads), so
    host memory holds one copy of the weights instead of a random LLM plus the loaded one.
    Refuses adapter exports and exports with LoRA weights (Stage III injects its own).
    `parts` replace parts as in `SeTokIM.from_config`; the SeTok comes from the export's
    `setok/` unless given.

    `defer_llm`: the LLM's parameters stay on the meta device (its buffers are computed and
    the rest is loaded), for `materialise_from_export` to fill once FSDP2 has sharded the
    model, so that each rank reads and holds only its rows instead of a whole copy.
    """
    from setok_tokenizer import SeTok
    from setokim.model.export import SETOK_DIR, is_adapter_export, load_full, read_config
    from setokim.model.setokim import SeTokIM

    directory = Path(directory)
    if is_adapter_export(directory):
        raise ValueError(f"{directory}: an adapter export; load it with SeTokIM.from_pretrained")
    cfg, _ = read_config(directory)
    if cfg.lora.enabled:
        raise ValueError(
            f"{directory}: holds LoRA weights; a Stage II (or merged) export is needed"
        )
    if "vision_tokenizer" not in parts:
        parts["vision_tokenizer"] = SeTok.from_pretrained(str(directory / SETOK_DIR))
    defer = LLM_PREFIX if defer_llm else None
    return load_full(SeTokIM, directory, parts, "cpu", defer=defer)


def _empty_meta(model: nn.Module, device: torch.device) -> None:
    """Allocate (uninitialised, on `device`) every meta tensor of `model`, leaving the others
    as they are. `model.to_empty` would also replace the real ones (LoRA adapters, SeTok);
    `_apply` at the root is what `to_empty` uses and lets FSDP2 re-register its shards."""
    model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)


def materialise_from_export(
    model: nn.Module, export: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> int:
    """Fill the tensors `model` has on the meta device (`load_export_on_meta(defer_llm=True)`)
    from `export` (one `model.safetensors` or sharded), after FSDP2 has sharded the model:
    each DTensor gets only its local rows, read as slices of the safetensors files, so a
    rank reads and holds about 1/world of the LLM. A LoRA base weight (`x.base_layer.w`,
    peft injects in place) is read from the export's `x.w`. Returns the bytes read; a
    tensor the export lacks, or whose shape does not fit, is an error naming it."""
    from setokim.train.parallel import meta_tensors

    export = Path(export)
    names = meta_tensors(model)
    saved = set(model.state_dict())
    lost = [n for n in names if n not in saved]
    if lost:
        raise RuntimeError(
            f"{lost[:5]}: non-persistent buffers on the meta device (no export has them)"
        )
    where = export_weight_files(export)
    keys = {n: n.replace(".base_layer.", ".") for n in names}
    missing = [k for k in keys.values() if k not in where]
    if missing:
        raise KeyError(f"{export}: the export lacks {missing[:5]} ({len(missing)} tensors)")
    _empty_meta(model, torch.device(device))
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return _fill_rows({n: (keys[n], tensors[n]) for n in names}, export, where)


__all__ = [
    "INDEX_FILE",
    "assign_shards",
    "checkpoint_tensors",
    "export_checkpoint_weights",
    "export_weight_files",
    "load_export_on_meta",
    "load_sharded_weights",
    "materialise_from_export",
    "read_index",
    "shard_name",
    "write_sharded_export",
]
