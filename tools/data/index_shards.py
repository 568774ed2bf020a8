"""Write the task-index sidecar (X.tar.index.json) of every shard of an existing shard dir.

Shard dirs written since sidecars exist already have them; this is for datasets converted
before, so planning a task mix stops scanning every tar. Each tar is hashed and must match
its manifest entry (a shard that does not is reported and gets no sidecar). Sidecars that
already match their manifest entry are kept unless --force. Example:
  python tools/data/index_shards.py data/setokim_stage2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from setokim.data.mix_plan import scan_shard
from setokim.data.shard_index import index_stale_reason, read_shard_index, write_shard_index
from setokim.data.shards import read_manifest, sha256_file


class IndexReport:
    """Shard names whose sidecar was written or kept; "shard: why" for those skipped.

    (A plain class: a dataclass needs its module registered, and the tests load this
    script by path.)
    """

    def __init__(self) -> None:
        self.written: list[str] = []
        self.kept: list[str] = []
        self.problems: list[str] = []


def _current(path: Path, entry: dict) -> bool:
    try:
        index = read_shard_index(path)
    except ValueError:
        return False
    return index is not None and not index_stale_reason(index, entry, path.stat().st_size)


def index_shard_dir(
    shard_dir: str | Path,
    splits: list[str] | None = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> IndexReport:
    """Write the missing (or, with `force`, every) sidecar of `shard_dir`'s shards."""
    manifest = read_manifest(shard_dir)
    unknown = sorted(set(splits or ()) - set(manifest["splits"]))
    if unknown:
        raise ValueError(f"splits {unknown} not in manifest (has {sorted(manifest['splits'])})")
    jobs = [
        s
        for split, body in manifest["splits"].items()
        if splits is None or split in splits
        for s in body["shards"]
    ]
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="index shards", unit="shard")
    report = IndexReport()
    for entry in jobs:
        path = Path(shard_dir) / entry["name"]
        if not path.is_file():
            report.problems.append(f"{entry['name']}: missing")
            continue
        if not force and _current(path, entry):
            report.kept.append(entry["name"])
            continue
        sha = sha256_file(path)
        if sha != entry["sha256"]:
            report.problems.append(f"{entry['name']}: sha256 {sha[:12]}... != manifest")
            continue
        rows = [(e.key, e.items, e.error) for e in scan_shard(path)]
        if len(rows) != int(entry["num_samples"]):
            report.problems.append(
                f"{entry['name']}: scan found {len(rows)} samples, manifest says "
                f"{entry['num_samples']}"
            )
            continue
        write_shard_index(path, sha, path.stat().st_size, rows)
        report.written.append(entry["name"])
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("shard_dir", help="directory with manifest.json and the tar shards")
    p.add_argument("--split", action="append", help="only these splits (repeatable)")
    p.add_argument("--force", action="store_true", help="rewrite sidecars that look current")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    report = index_shard_dir(a.shard_dir, a.split, force=a.force, progress=not a.no_progress)
    for line in report.problems:
        print(line)
    print(
        f"{len(report.written)} sidecar(s) written, {len(report.kept)} already current, "
        f"{len(report.problems)} shard(s) skipped with a problem"
    )
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
