"""Verify shards against the manifest and decode every sample (tools/check_shards.py).

A shard's index sidecar, when present, must describe it: recorded for the manifest's
sha256/size/count, and the same keys and item counts per task as a scan of the tar. A
missing sidecar is fine (datasets written before sidecars existed).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from setokim.data.decode import DataError, decode_sample
from setokim.data.mix_plan import scan_shard
from setokim.data.schema import TASKS
from setokim.data.shard_index import index_name, index_stale_reason, read_shard_index
from setokim.data.shards import (
    MANIFEST_NAME,
    iter_tar_groups,
    raw_sample,
    read_manifest,
    sha256_file,
)
from setokim.data.views import items_for


@dataclass
class Problem:
    shard: str
    key: str | None
    reason: str

    def __str__(self) -> str:
        return f"{self.shard}" + (f" [{self.key}]" if self.key else "") + f": {self.reason}"


def _samples(path: Path) -> Iterator[dict]:
    for key, members in iter_tar_groups(path):
        yield raw_sample(key, path.name, members)


def check_index(path: Path, entry: dict) -> Iterator[Problem]:
    """Problems of the sidecar of shard `path` (manifest `entry`): stale, malformed, or keys
    and counts that differ from a scan of the tar. No sidecar: no problem."""
    side = index_name(path.name)
    try:
        index = read_shard_index(path)
    except ValueError as exc:
        yield Problem(path.name, None, f"index sidecar {side}: {exc}")
        return
    if index is None:
        return
    why = index_stale_reason(index, entry, path.stat().st_size)
    if why:
        yield Problem(path.name, None, f"index sidecar {side} is stale: {why}")
    scanned = [(e.key, e.items, e.error) for e in scan_shard(path)]
    for i, (got, want) in enumerate(zip(index.rows, scanned, strict=False)):
        if got != want:
            yield Problem(
                path.name, want[0], f"index sidecar {side} row {i}: {got[:2]} != tar {want[:2]}"
            )
            return  # one mismatch says the sidecar is wrong; the rest would repeat it
    if len(index.rows) != len(scanned):
        yield Problem(
            path.name, None, f"index sidecar {side}: {len(index.rows)} rows, tar {len(scanned)}"
        )


def check_shard(
    path: Path, expected_sha: str, expected_count: int, entry: dict | None = None
) -> Iterator[Problem]:
    """Problems of one shard: missing, hash mismatch, unreadable, wrong count, bad samples,
    and (given its manifest `entry`) a sidecar index that does not describe it."""
    if not path.is_file():
        yield Problem(path.name, None, "missing")
        return
    if entry is not None:
        yield from check_index(path, entry)
    digest = sha256_file(path)
    if digest != expected_sha:
        yield Problem(
            path.name, None, f"sha256 {digest[:12]}... != manifest {expected_sha[:12]}..."
        )
    n, last = 0, None
    try:
        for raw in _samples(path):
            n, last = n + 1, raw["__key__"]
            try:
                d = decode_sample(raw, None)
                d.ann.check_types()
                for task in TASKS:
                    items_for(d, task, seed=0, epoch=0, expand=True)
            except DataError as err:
                yield Problem(path.name, err.key, err.reason)
            except Exception as exc:  # noqa: BLE001 - report every bad annotation
                yield Problem(path.name, last, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - tar-level damage
        yield Problem(path.name, last, f"unreadable after {n} samples: {type(exc).__name__}: {exc}")
        return
    if n != expected_count:
        yield Problem(path.name, last, f"holds {n} samples, manifest says {expected_count}")


def check_shards(
    shard_dir: str | Path, splits: list[str] | None = None, progress: bool = False
) -> list[Problem]:
    """Every problem found in `shard_dir` (empty list: all shards verify and decode).

    A folder that is missing, or holds no manifest (not a shard folder), or a split it does
    not have raises FileNotFoundError / ValueError saying so (no problem list to report).
    """
    folder = Path(shard_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"shard_dir {str(folder)!r} does not exist or is not a folder")
    if not (folder / MANIFEST_NAME).is_file():
        what = "is empty" if not any(folder.iterdir()) else f"has no {MANIFEST_NAME}"
        raise FileNotFoundError(
            f"shard_dir {str(folder)!r} {what}: not a shard folder (write one with "
            "tools/make_shapes_world.py or a converter in tools/data/)"
        )
    manifest = read_manifest(shard_dir)
    unknown = sorted(set(splits or ()) - set(manifest["splits"]))
    if unknown:
        raise ValueError(
            f"split(s) {unknown} not in {str(folder)!r} (has {sorted(manifest['splits'])})"
        )
    jobs = [
        (Path(shard_dir) / s["name"], s["sha256"], int(s["num_samples"]), s)
        for split, body in manifest["splits"].items()
        if splits is None or split in splits
        for s in body["shards"]
    ]
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="check shards", unit="shard")
    return [p for job in jobs for p in check_shard(*job)]
