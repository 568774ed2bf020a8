"""Atomic, verified, resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout under `<run_dir>/checkpoints/`:
    step_00000010/         DCP shards (`__<rank>_<i>.distcp`) of {"model", "optim"}, DCP's
                           own `.metadata`, trainer_state.json, rng_rank<r>.safetensors
                           (one per rank) and, written last, manifest.json
    latest                 text file naming the newest complete step directory
A step directory is written as `step_N.tmp` and renamed only when every rank finished and
the manifest (size and SHA-256 of every other file) is in place; `latest` is replaced
atomically after that, so a kill at any moment leaves the previous checkpoint intact.

Resume (`resume_checkpoint`) takes the newest step directory whose files match its
manifest; one that does not (flipped bytes, a truncated or emptied file, a missing or extra
file) is renamed `step_N.rejected` with a warning naming the file, and the one before it is
tried. Nothing read from a checkpoint is unpickled with arbitrary classes: RNG state is
safetensors, trainer state JSON, and DCP's pickled `.metadata` and non-tensor entries are
read with an allow-list unpickler / `torch.load(weights_only=True)`.

The optimizer holds state for every trainable parameter from step 0 (`init_optimizer_state`),
so a checkpoint taken before some parameters first received a gradient (Stage I sub-phase 1
of a combined run) has the same keys as one taken after. DCP reshards on load, so a 2-rank
checkpoint loads on 1 rank: `load_model_state` (exports, evaluation) at any world size;
training resumes on another world size only with `TrainerConfig.world_size_change="reshard"`
and the global batch kept, and is refused otherwise naming both world sizes
(`resume_data_position`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.optim.optimizer import _get_scalar_dtype

from setokim.train.rng import load_rng_file, save_rng_file, seed_all, set_rng_state
from setokim.utils.io import atomic_write_json, atomic_write_text

STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "setokim-checkpoint-1"
FROZEN_FILE = "frozen_sources.json"
REJECTED_SUFFIX = ".rejected"
_HASH_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path and what is wrong."""


@dataclass
class TrainerState:
    """Everything besides model/optimizer weights needed to continue a run exactly."""

    step: int
    data_position: int  # micro-batches consumed per rank
    skipped_steps: int
    nonfinite_in_row: int
    world_size: int
    scheduler: dict[str, Any]
    # Absent in checkpoints written before world-size resharding existed (None then).
    micro_batch_size: int | None = None
    grad_accum: int | None = None


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


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj` on every rank (in-memory pickles between the job's own processes)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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
        raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint")
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


# ---- optimizer state ----------------------------------------------------------------------------
def init_optimizer_state(optimizer: torch.optim.Optimizer) -> int:
    """Give every parameter of an Adam/AdamW its (zero) state now instead of at its first step.

    Exactly what Adam's lazy initialisation would create (step 0, zero moments), so the
    trajectory is unchanged; but every checkpoint then holds the state of every trainable
    parameter, also of those that get their first gradient later (Stage I's encoder and
    mask decoder after the sub-phase-1 batches of a combined run). Returns how many
    parameters got state.
    """
    if not isinstance(optimizer, torch.optim.Adam):
        raise TypeError(
            f"init_optimizer_state: supports Adam/AdamW, got {type(optimizer).__name__}"
        )
    count = 0
    for group in optimizer.param_groups:
        device_step = group["capturable"] or group["fused"]
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            state["step"] = (
                torch.zeros((), dtype=_get_scalar_dtype(is_fused=group["fused"]), device=p.device)
                if device_step
                else torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")
            )
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            count += 1
    return count


# ---- manifest -----------------------------------------------------------------------------------
def file_digest(path: Path) -> dict[str, Any]:
    """{"size", "sha256"} of one file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _files_of(step_dir: Path) -> list[str]:
    """Relative paths of every file under a step directory but the manifest, sorted."""
    names = [
        p.relative_to(step_dir).as_posix()
        for p in step_dir.rglob("*")
        if p.is_file() or p.is_symlink()
    ]
    return sorted(n for n in names if n != MANIFEST_FILE)


def write_manifest(step_dir: Path, step: int) -> Path:
    """Collective: hash every file of `step_dir` (shared out over ranks); rank 0 writes the
    manifest atomically. Call when every other file of the checkpoint is in place."""
    names = _files_of(step_dir)
    rank, world = _rank(), _world()
    mine = {name: file_digest(step_dir / name) for name in names[rank::world]}
    entries: dict[str, Any] = {}
    for part in _all_gather(mine):
        entries.update(part)
    path = step_dir / MANIFEST_FILE
    if rank == 0:
        atomic_write_json(path, {"format": MANIFEST_FORMAT, "step": step, "files": entries})
    return path


def _read_manifest(step_dir: Path) -> dict[str, Any]:
    path = step_dir / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing (an older checkpoint format?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is unreadable: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path}: format is not {MANIFEST_FORMAT!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path}: no file entries")
    return manifest


def _check_file(step_dir: Path, name: str, want: Any) -> str | None:
    """None when the file matches its manifest entry, else what is wrong (naming the file)."""
    path = step_dir / name
    if not isinstance(want, dict) or not {"size", "sha256"} <= want.keys():
        return f"{step_dir / MANIFEST_FILE}: bad entry for {name}"
    try:
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path}: {size} bytes, the manifest says {want['size']} (truncated or grown)"
        got = file_digest(path)
    except OSError as err:
        return f"{path}: {err.strerror or err}"
    if got["sha256"] != want["sha256"]:
        return f"{path}: SHA-256 differs from the manifest (content changed)"
    return None


def verify_checkpoint(step_dir: Path) -> list[str]:
    """Collective: problems of `step_dir` against its manifest (empty = verified).

    Every rank hashes a share of the files; every rank returns the same list.
    """
    step_dir = Path(step_dir)
    rank, world = _rank(), _world()
    problems: list[str] = []
    try:
        listed = _read_manifest(step_dir)["files"]
    except CheckpointError as err:
        problems.append(str(err))
        listed = None
    if listed is not None:
        if rank == 0:
            extra = sorted(set(_files_of(step_dir)) - set(listed))
            problems += [f"{step_dir / name}: not in the manifest" for name in extra]
        for name in sorted(listed)[rank::world]:
            problem = _check_file(step_dir, name, listed[name])
            if problem:
                problems.append(problem)
    merged: list[str] = []
    for part in _all_gather(problems):
        merged += [p for p in part if p not in merged]
    return merged


def resume_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """Collective: (newest verified step directory or None, warnings about rejected ones).

    Each step directory that fails verification is renamed `step_N.rejected` (kept for
    inspection, never loaded or pruned) with a warning naming the file. When step
    directories exist but none verifies this raises rather than start over.
    """
    rejected: list[str] = []
    candidates = list_checkpoints(run_dir)
    for step_dir in reversed(candidates):
        problems = verify_checkpoint(step_dir)
        if not problems:
            return step_dir, rejected
        note = f"checkpoint {step_dir} failed verification: " + "; ".join(problems)
        _barrier()
        if _rank() == 0:
            target = step_dir.with_name(step_dir.name + REJECTED_SUFFIX)
            if target.exists():
                shutil.rmtree(target)
            os.replace(step_dir, target)
            note += f"; moved to {target.name}, trying the previous checkpoint"
        _barrier()
        warnings.warn(note, RuntimeWarning, stacklevel=2)
        rejected.append(note)
    if candidates:
        raise CheckpointError(
            f"no checkpoint under {checkpoint_root(run_dir)} passed verification: "
            + " | ".join(rejected)
            + " — delete the run directory's checkpoints/ (or set resume=false) to start over"
        )
    return None, rejected


# ---- safe DCP reading ---------------------------------------------------------------------------
_SAFE_MODULES = ("torch.distributed.checkpoint.", "torch.distributed.tensor.")
_SAFE_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # layout by name
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: DCP's and torch's plain data classes, torch dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_SAFE_MODULES) or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


class SafeFileSystemReader(FileSystemReader):
    """DCP's reader with `.metadata` unpickled through an allow-list instead of pickle.load."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError) as err:
            raise CheckpointError(f"{path}: not readable DCP metadata: {err}") from err
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner with non-tensor entries read by `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _dcp_load(bundle: dict[str, Any], path: Path) -> None:
    try:
        with _quiet_single_process():
            dcp.load(bundle, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
    except CheckpointError:
        raise
    except CheckpointException as err:  # a BaseException carrying each rank's failure
        reasons = sorted({_root_cause(pair[0]) for pair in err.failures.values()})
        raise CheckpointError(
            f"checkpoint {path} could not be loaded: {'; '.join(reasons)}"
        ) from err
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} could not be loaded: {err}") from err


def _root_cause(exc: BaseException) -> str:
    """The innermost exception's message (DCP chains its own assertions on top)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        if isinstance(exc, CheckpointError) or nxt is None:
            break
        exc = nxt
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__


# ---- frozen sources -----------------------------------------------------------------------------
def tree_sha256(path: str | os.PathLike[str]) -> str:
    """One SHA-256 over a file, or over every file under a directory (relative name + each
    file's SHA-256, sorted): what a frozen module was built from."""
    root = Path(path)
    if root.is_file():
        return file_digest(root)["sha256"]
    if not root.is_dir():
        raise CheckpointError(f"frozen source {root} does not exist")
    digest = hashlib.sha256()
    for name in sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()):
        digest.update(f"{name}={file_digest(root / name)['sha256']}\n".encode())
    return digest.hexdigest()


def frozen_record(sources: Mapping[str, str | os.PathLike[str]]) -> dict[str, dict[str, str]]:
    """Collective: {name: {"path", "sha256"}} of the files a stage's frozen modules are built
    from (`Stage.frozen_sources`). Rank 0 reads and hashes them once; every rank gets it."""
    record: dict[str, dict[str, str]] | None = None
    if _rank() == 0:
        record = {
            name: {"path": str(Path(src).resolve()), "sha256": tree_sha256(src)}
            for name, src in sorted(sources.items())
        }
    if dist.is_initialized():
        box = [record]
        dist.broadcast_object_list(box, src=0)
        record = box[0]
    assert record is not None
    return record


def read_frozen_record(step_dir: Path) -> dict[str, dict[str, str]] | None:
    """A checkpoint's frozen-source record, or None when it stores every weight."""
    path = Path(step_dir) / FROZEN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is unreadable: {err}") from err
    if not isinstance(record, dict) or not all(
        isinstance(v, dict) and {"path", "sha256"} <= v.keys() for v in record.values()
    ):
        raise CheckpointError(f"{path}: expected {{name: {{path, sha256}}}}")
    return record


def check_frozen_sources(
    step_dir: Path, current: Mapping[str, Mapping[str, str]] | None = None
) -> None:
    """Refuse a checkpoint whose frozen modules would come from other bytes than at save.

    `current`: the record of what the model was built from now (`frozen_record`); None
    re-hashes the recorded paths. A changed file under a recorded path (a SeTok export
    retrained or overwritten in place) or another source is a CheckpointError naming it.
    """
    saved = read_frozen_record(step_dir)
    if saved is None:
        return
    if current is None:
        current = {}
        for name, entry in saved.items():
            try:
                current[name] = {"path": entry["path"], "sha256": tree_sha256(entry["path"])}
            except CheckpointError as err:
                raise CheckpointError(
                    f"checkpoint {step_dir} needs its frozen {name} from {entry['path']}: {err}"
                ) from None
    if set(saved) != set(current):
        raise CheckpointError(
            f"checkpoint {step_dir} was trained over frozen source(s) {sorted(saved)}, the "
            f"model now is built from {sorted(current)}"
        )
    for name, entry in saved.items():
        now = current[name]
        if now["sha256"] != entry["sha256"]:
            raise CheckpointError(
                f"checkpoint {step_dir} was trained over the frozen {name} at {entry['path']} "
                f"(SHA-256 {entry['sha256'][:16]}...); {now['path']} now hashes to "
                f"{now['sha256'][:16]}...: the frozen {name} changed since. Restore it, or "
                "start a fresh run dir (the checkpoint does not store frozen weights)"
            )


# ---- save / load --------------------------------------------------------------------------------
def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    keep_last: int,
    frozen: Mapping[str, Mapping[str, str]] | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the final step directory.

    `frozen` (a `frozen_record`): the model's frozen parameters are not stored; the record
    of the files they are rebuilt from is (frozen_sources.json, covered by the manifest).
    """
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

    options = StateDictOptions(ignore_frozen_params=frozen is not None)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    with _quiet_single_process():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    save_rng_file(tmp / f"rng_rank{rank}.safetensors")
    if rank == 0:
        atomic_write_json(tmp / STATE_FILE, state.__dict__)
        if frozen is not None:
            atomic_write_json(tmp / FROZEN_FILE, dict(frozen))
    _barrier()
    write_manifest(tmp, state.step)
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


def read_trainer_state(path: Path) -> TrainerState:
    """The trainer_state.json of a step directory; errors name the file and the problem."""
    file = Path(path) / STATE_FILE
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} is unreadable: {err}") from err
    names = {f.name for f in fields(TrainerState)}
    required = {f.name for f in fields(TrainerState) if f.default is MISSING}
    if not isinstance(raw, dict) or not required <= set(raw) <= names:
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{file}: expected keys {sorted(names)}, got {got}")
    return TrainerState(**raw)


def resume_data_position(
    state: TrainerState,
    path: Path,
    *,
    world_size: int,
    micro_batch_size: int,
    grad_accum: int,
    policy: str,
) -> int:
    """This rank's data position (micro-batches) for resuming `state` on `world_size` ranks.

    Same world size: the saved position. Another world size is refused (policy "refuse",
    the error names both world sizes) or resharded (policy "reshard"): DCP reshards weights
    and optimizer on load, and the position keeps the samples consumed globally
    (position x micro_batch_size x world_size). Resharding needs the global batch
    (micro_batch_size x grad_accum x world_size) unchanged, so every step, the learning
    rate schedule and the epoch length in steps stay what they were; adjust
    micro_batch_size or grad_accum to keep it. Which samples each rank reads in the current
    epoch depends on the world size (shard split, per-rank shuffle), so the rest of that
    epoch is not the one the uninterrupted run would have read.
    """
    old_world = state.world_size
    if old_world == world_size:
        return state.data_position
    where = f"checkpoint {path} was written by {old_world} rank(s), this run has {world_size}"
    if policy != "reshard":
        raise CheckpointError(
            f"{where}; resuming would change every rank's data position and the schedule. "
            f"Relaunch on {old_world} rank(s), or set trainer.world_size_change=reshard "
            "(keeping micro_batch_size x grad_accum x world_size), or start a fresh run dir"
        )
    if state.micro_batch_size is None or state.grad_accum is None:
        raise CheckpointError(
            f"{where}; it does not record its micro_batch_size / grad_accum (an older "
            "checkpoint), so it cannot be resharded: relaunch on "
            f"{old_world} rank(s)"
        )
    old_batch = state.micro_batch_size * state.grad_accum * old_world
    new_batch = micro_batch_size * grad_accum * world_size
    if old_batch != new_batch:
        raise CheckpointError(
            f"{where}; resharding keeps the global batch, which was {old_batch} "
            f"(micro_batch_size {state.micro_batch_size} x grad_accum {state.grad_accum} x "
            f"{old_world}) and would be {new_batch} (micro_batch_size {micro_batch_size} x "
            f"grad_accum {grad_accum} x {world_size}): choose micro_batch_size and grad_accum "
            f"with a product of {old_batch / world_size:g}"
        )
    samples = state.data_position * state.micro_batch_size * old_world
    per_micro = micro_batch_size * world_size
    if samples % per_micro:
        raise CheckpointError(
            f"{where}; its {samples} samples consumed are not a whole number of "
            f"micro-batches of {micro_batch_size} x {world_size} ranks"
        )
    return samples // per_micro


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    seed: int,
    frozen: Mapping[str, Mapping[str, str]] | None = None,
) -> TrainerState:
    """Collective: load weights + optimizer (resharding as needed) and this rank's RNG.

    A rank that has no RNG file of its own (the job grew) is re-seeded from (seed, rank, step).
    `frozen`: what the model's frozen parameters were built from now (`frozen_record`);
    they are not read from the checkpoint, and a checkpoint trained over other frozen
    bytes is refused (`check_frozen_sources`). Verify first (`resume_checkpoint`).
    """
    path = Path(path)
    state = read_trainer_state(path)
    if frozen is not None:
        check_frozen_sources(path, frozen)
    elif read_frozen_record(path) is not None:
        raise CheckpointError(
            f"checkpoint {path} does not store its frozen parameters (frozen_sources.json); "
            "this model declares no frozen sources to rebuild them from"
        )
    options = StateDictOptions(ignore_frozen_params=frozen is not None, strict=frozen is None)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    bundle = {"model": model_sd, "optim": optim_sd}
    _dcp_load(bundle, path)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=bundle["model"],
        optim_state_dict=bundle["optim"],
        options=options,
    )
    rank = _rank()
    rng_file = path / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        try:
            set_rng_state(load_rng_file(rng_file))
        except ValueError as err:
            raise CheckpointError(str(err)) from err
    else:
        seed_all(seed + 1_000_003 * rank + state.step)
    return state


def load_model_state(path: Path, model: nn.Module, *, verify: bool = True) -> nn.Module:
    """Load only the model weights of a step directory (any world size) into `model`.

    For evaluation, exports and the next stage's init: no optimizer, no RNG, no process
    group needed. The checkpoint is verified against its manifest first (collective when a
    process group exists: every rank of it must call this). A checkpoint without frozen
    weights (frozen_sources.json) loads the trained ones only; the model's frozen
    parameters must then come from the recorded sources, which are re-hashed here.
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"path: {path} is not a complete checkpoint directory")
    if verify:
        problems = verify_checkpoint(path)
        if problems:
            raise CheckpointError(f"checkpoint {path} failed verification: " + "; ".join(problems))
    if read_frozen_record(path) is None:
        bundle = {"model": model.state_dict()}
        _dcp_load(bundle, path)
        model.load_state_dict(bundle["model"])
        return model
    check_frozen_sources(path)
    options = StateDictOptions(ignore_frozen_params=True)
    bundle = {"model": get_model_state_dict(model, options=options)}
    _dcp_load(bundle, path)
    missing, unexpected = model.load_state_dict(bundle["model"], strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if unexpected or set(missing) - frozen:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: missing "
            f"{sorted(set(missing) - frozen)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model
