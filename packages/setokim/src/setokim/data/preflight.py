"""Launch-time check of the data against what each training step will read.

Before anything trains, each step's data (its shard folder, split, task or task mix, micro
batch and the world size) is checked against the shards' task indexes (sidecars, else a scan
of the .json members; no image is read): a step that would get no full batch fails naming
the step, the task and what the shards hold, instead of failing minutes into the run when
that step starts. Stage I sub-phase 2 (mask decoder against object masks) on data whose
samples carry no object mask is refused too, unless `data.allow_missing_masks` says so.

A missing shard folder is an error unless the experiment generates Shapes World there
(`data.generate=true`, which the Shapes World recipes set); generated data has every task,
so those steps are not checked further.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from setokim.data.config import DataConfig
from setokim.data.schema import IMAGE_VIEW, TASKS
from setokim.data.shards import MANIFEST_NAME, iter_tar_samples, read_manifest

MASK_PROBE = 256  # samples whose annotations are read to find an object mask


class DataCheckError(ValueError):
    """A step's data cannot feed it; the message names the step, the task and the shards."""


@dataclass(frozen=True)
class StepData:
    """What one training step reads: where, which view, how many per batch, and whether it
    trains on object masks (Stage I sub-phases 0 and 2)."""

    step: str
    data: DataConfig
    micro_batch_size: int
    needs_masks: bool = False


@dataclass(frozen=True)
class SplitCounts:
    """Samples of a split, and per task the samples that have it and their items."""

    samples: int
    with_task: dict[str, int]
    items: dict[str, int]

    def describe(self) -> str:
        held = {t: n for t, n in self.with_task.items() if n}
        return f"{self.samples} samples; per task (samples): {held or 'no task items'}"


def split_counts(shard_dir: str | Path, split: str) -> SplitCounts:
    """Per task counts of one split, from the shard indexes (no image is read)."""
    from setokim.data.mix_plan import index_shard

    manifest = read_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise DataCheckError(
            f"split {split!r} is not in {shard_dir} (it has {sorted(manifest['splits'])})"
        )
    with_task = dict.fromkeys(TASKS, 0)
    items = dict.fromkeys(TASKS, 0)
    samples = 0
    for s in manifest["splits"][split]["shards"]:
        for entry in index_shard(Path(shard_dir) / s["name"]):
            samples += 1
            for t, n in zip(TASKS, entry.items or (), strict=False):
                with_task[t] += n > 0
                items[t] += n
    return SplitCounts(samples, with_task, items)


def has_object_masks(shard_dir: str | Path, split: str, probe: int = MASK_PROBE) -> bool:
    """Whether any of the first `probe` samples of `split` has an object with a mask."""
    import json

    manifest = read_manifest(shard_dir)
    seen = 0
    for s in manifest["splits"][split]["shards"]:
        for _, files in iter_tar_samples(Path(shard_dir) / s["name"], lambda e: e == "json"):
            ann = json.loads(files.get("json", b"{}"))
            if any(o.get("mask") for o in ann.get("objects") or ()):
                return True
            seen += 1
            if seen >= probe:
                return False
    return False


def check_step(
    step: StepData, world_size: int = 1, generate: bool = False, missing_ok: bool = False
) -> list[str]:
    """Raise DataCheckError when `step` would get no full batch (or no masks it needs);
    return notes worth printing (mix tasks that are never drawn). `missing_ok`: a shard
    folder this machine cannot see is a note, not an error (a SLURM job's data may live on
    the compute nodes only; the job then fails at its start, before training)."""
    d, where = step.data, f"step {step.step!r}"
    folder = Path(d.shard_dir)
    if not (folder / MANIFEST_NAME).is_file():
        if generate:
            return [
                f"{where}: {folder} has no dataset; Shapes World is generated there (data.generate=true)"
            ]
        what = "does not exist" if not folder.exists() else f"has no {MANIFEST_NAME}"
        if missing_ok:
            return [f"{where}: data.shard_dir {str(folder)!r} {what} here; not checked"]
        raise DataCheckError(
            f"{where}: data.shard_dir {str(folder)!r} {what}: convert data there "
            "(tools/data/), or pass data.generate=true to generate Shapes World"
        )
    counts = split_counts(folder, d.split)
    need = step.micro_batch_size * world_size
    holds = f"split {d.split!r} of {folder} holds {counts.describe()}"
    notes: list[str] = []
    if d.task == "mix":
        weighted = sorted(t for t, w in (d.mix_weights or {}).items() if w > 0)
        absent = [t for t in weighted if counts.with_task.get(t, 0) == 0]
        per = counts.items if d.expand else counts.with_task
        best = max((per.get(t, 0) for t in weighted), default=0)
        if best < need:
            raise DataCheckError(
                f"{where}: task mix {weighted} gets no full batch of {step.micro_batch_size} x "
                f"{world_size} rank(s): {holds}"
            )
        if absent:
            notes.append(f"{where}: mix tasks {absent} are in no sample of {holds}: never drawn")
    else:
        if d.task == IMAGE_VIEW:
            have = counts.samples
        else:
            have = (counts.items if d.expand else counts.with_task).get(d.task, 0)
        if have < need:
            raise DataCheckError(
                f"{where}: task {d.task!r} gets no full batch of {step.micro_batch_size} x "
                f"{world_size} rank(s) ({have} {'items' if d.expand else 'samples'} have it): {holds}"
            )
    if step.needs_masks and not d.allow_missing_masks and not has_object_masks(folder, d.split):
        raise DataCheckError(
            f"{where}: Stage I reads object masks (sub-phase 0 names each object, sub-phase 2 "
            f"trains the mask decoder), but the first {MASK_PROBE} samples of split "
            f"{d.split!r} of {folder} have none (BCE and Dice would be 0 and the KL would push "
            "every cluster to background); use data with masks (COCO, SA-1B), subphase=1 with "
            "subphase0_batches=0 and attribute_weight=0, or data.allow_missing_masks=true"
        )
    return notes
