"""Combine splits of several shard dirs into one split of a new shard dir.

A training stage reads one split of one shard dir, while paper Stages II and III train on
several datasets at once (Table 6), each converted into its own shard dir. Merging never
re-encodes a sample: the source shards are hard-linked (same filesystem), copied or
symlinked into the new dir under source-prefixed names, and a manifest in the format of
`shards.py` lists them, so the loader, `check_shards` and `dataset_version` work unchanged.

A source with `key_prefix` is the one exception: its shards are rewritten with every sample
key (tar member names and the annotation's "key") prefixed, for sources whose keys would
otherwise collide (e.g. two Shapes World datasets of different seeds). Its images are still
byte-identical; only the annotation JSON and the tar change.

Sample keys must be unique across the merged split (the task mix seeds its draw by key).
Shard first_key/last_key cannot prove that (converters do not write keys in sorted order),
so every source shard's tar headers are read: one 512-byte header per tar member, the data
is seeked past, never read (about the cost of `ls` on the members).

Compatibility: every source manifest must be in `MANIFEST_FORMAT` (`read_manifest` refuses
any other), so formats cannot differ. Manifests record no image handling the loader depends
on (converters keep the original image bytes and sizes, Shapes World stores PNGs of its
`image_size`), so sources of different image sizes merge; train them with the loader's
`image_size` set (the cluster recipes set 224), since unresized images of different sizes
cannot be collated. The merged info keeps `image_size` only when all sources agree.

Shard index sidecars (`shard_index.index_name`) travel with their shards: placed the same way
(they hold no shard name, so a renamed shard keeps a valid one) when the source's sidecar
matches its manifest entry, left out otherwise (the loader then scans that tar); rewritten
sources get fresh ones from the ShardWriter.

The merged dir holds only manifest.json, the shards and their sidecars; the dataset card (dataset_card.json,
README.md) stays per source, and the manifest's info lists the sources, their split,
version and counts. The merged `version` is the manifest's usual hash of its shards' sha256s,
i.e. of exactly the source shards taken (a source whose other splits change keeps it).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from setokim.data.shard_index import index_name, index_stale_reason, read_shard_index
from setokim.data.shards import (
    ShardInfo,
    ShardWriter,
    iter_tar_samples,
    read_manifest,
    safe_key,
    write_manifest,
)
from setokim.utils.io import write_dir_atomically

LINK_MODES = ("hard", "copy", "symlink")


@dataclass(frozen=True)
class MergeSource:
    """One split of one shard dir to merge.

    name: prefix of this source's shard file names (default: "{index:02d}-{dir name}");
    key_prefix: when given, the shards are rewritten with every key prefixed (see module doc).
    """

    shard_dir: str | Path
    split: str = "train"
    name: str | None = None
    key_prefix: str = ""

    @classmethod
    def parse(cls, text: str) -> MergeSource:
        """From the CLI form ``DIR[:SPLIT[:KEY_PREFIX]]``."""
        parts = str(text).split(":")
        if len(parts) > 3 or not parts[0] or any(p == "" for p in parts[1:2]):
            raise ValueError(f"source must be DIR[:SPLIT[:KEY_PREFIX]], got {text!r}")
        split = parts[1] if len(parts) > 1 else "train"
        return cls(parts[0], split, key_prefix=parts[2] if len(parts) > 2 else "")


@dataclass
class _Planned:
    source: MergeSource
    name: str
    manifest: dict[str, Any]
    shards: list[dict[str, Any]]  # the source manifest's shard entries of the split


def _plan(sources: Sequence[MergeSource]) -> list[_Planned]:
    """Read and validate every source manifest; fix each source's shard-name prefix."""
    if not sources:
        raise ValueError("sources must name at least one shard dir")
    planned: list[_Planned] = []
    names: dict[str, int] = {}
    for i, src in enumerate(sources):
        if not isinstance(src, MergeSource):
            raise TypeError(f"sources[{i}] must be a MergeSource, got {type(src).__name__}")
        if src.key_prefix and safe_key(src.key_prefix) != src.key_prefix:
            raise ValueError(
                f"sources[{i}].key_prefix must match [A-Za-z0-9_-]+, got {src.key_prefix!r}"
            )
        manifest = read_manifest(src.shard_dir)  # refuses any format but MANIFEST_FORMAT
        if src.split not in manifest["splits"]:
            raise ValueError(
                f"sources[{i}] {str(src.shard_dir)!r} has no split {src.split!r} "
                f"(has {sorted(manifest['splits'])})"
            )
        name = src.name or f"{i:02d}-{safe_key(Path(src.shard_dir).resolve().name)}"
        if safe_key(name) != name:
            raise ValueError(f"sources[{i}].name must match [A-Za-z0-9_-]+, got {name!r}")
        if name in names:
            raise ValueError(f"sources[{names[name]}] and sources[{i}] share the name {name!r}")
        names[name] = i
        shards = list(manifest["splits"][src.split]["shards"])
        planned.append(_Planned(src, name, manifest, shards))
    return planned


def _check_keys(planned: list[_Planned], progress: bool) -> None:
    """Every key once across all sources; each shard as long as its manifest says."""
    seen: dict[str, str] = {}
    jobs = [(p, s) for p in planned for s in p.shards]
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="merge: read keys", unit="shard")
    for p, s in jobs:
        where = f"{p.source.shard_dir}:{p.source.split} ({s['name']})"
        path = Path(p.source.shard_dir) / s["name"]
        if not path.is_file():
            raise FileNotFoundError(f"source {where}: shard file is missing")
        if path.stat().st_size != int(s["bytes"]):
            raise ValueError(
                f"source {where}: {path.stat().st_size} bytes, manifest says {s['bytes']}"
            )
        n = 0
        for key, _ in iter_tar_samples(path, read=lambda ext: False):
            n += 1
            full = p.source.key_prefix + key
            if full in seen:
                raise ValueError(
                    f"sample key {full!r} is in both {seen[full]} and {where}; give one of "
                    f"them a key_prefix (DIR:SPLIT:PREFIX)"
                )
            seen[full] = where
        if n != int(s["num_samples"]):
            raise ValueError(f"source {where}: holds {n} samples, manifest says {s['num_samples']}")


def _place(src: Path, dst: Path, link: str) -> None:
    """Put one source shard at `dst` without ever opening the source for writing."""
    if link == "symlink":
        os.symlink(src.resolve(), dst)
        return
    if link == "hard":
        try:
            os.link(src, dst)
            return
        except OSError:  # another filesystem, or links not supported: copy instead
            pass
    shutil.copyfile(src, dst)


def _place_index(src: Path, dst: Path, entry: dict[str, Any], link: str) -> None:
    """Place the sidecar of source shard `src` beside `dst` if it describes that shard."""
    try:
        index = read_shard_index(src)
    except (OSError, ValueError):
        return
    if index is not None and not index_stale_reason(index, entry, int(entry["bytes"])):
        _place(src.with_name(index_name(src.name)), dst.with_name(index_name(dst.name)), link)


def _rekey_samples(path: Path, prefix: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(prefixed key, files) of one tar in order; the annotation's "key" is prefixed too."""
    for key, files in iter_tar_samples(path):
        if "json" in files:
            ann = json.loads(files["json"])
            ann["key"] = prefix + str(ann.get("key", key))
            files["json"] = json.dumps(ann, sort_keys=True, separators=(",", ":")).encode()
        yield prefix + key, files


def _fill(tmp: Path, planned: list[_Planned], split: str, link: str, progress: bool) -> None:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(p.shards) for p in planned), desc="merge: shards", unit="shard")
    out: list[ShardInfo] = []
    for p in planned:
        src_dir = Path(p.source.shard_dir)
        prefix = f"{split}-{p.name}"
        if p.source.key_prefix and p.shards:
            per = max(int(s["num_samples"]) for s in p.shards)
            writer = ShardWriter(tmp, prefix, samples_per_shard=per)
            for s in p.shards:
                for key, files in _rekey_samples(src_dir / s["name"], p.source.key_prefix):
                    writer.write(key, files)
                if bar is not None:
                    bar.update(1)
            out.extend(writer.close())
            continue
        for j, s in enumerate(p.shards):
            name = f"{prefix}-{j:06d}.tar"
            _place(src_dir / s["name"], tmp / name, link)
            _place_index(src_dir / s["name"], tmp / name, s, link)
            out.append(ShardInfo(**{**s, "name": name}))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    write_manifest(tmp, {split: out}, _info(planned, link))


def _info(planned: list[_Planned], link: str) -> dict[str, Any]:
    sources = [
        {
            "path": str(Path(p.source.shard_dir).resolve()),
            "split": p.source.split,
            "name": p.name,
            "key_prefix": p.source.key_prefix,
            "version": p.manifest["version"],
            "num_samples": int(p.manifest["splits"][p.source.split]["num_samples"]),
            "num_shards": len(p.shards),
            "source": p.manifest.get("info", {}).get("source"),
        }
        for p in planned
    ]
    info: dict[str, Any] = {"source": "merge", "link": link, "sources": sources}
    sizes = {p.manifest.get("info", {}).get("image_size") for p in planned}
    if len(sizes) == 1 and None not in sizes:
        info["image_size"] = sizes.pop()  # stored image size, only when every source agrees
    return info


def merge_datasets(
    sources: Sequence[MergeSource],
    out_dir: str | Path,
    *,
    split: str = "train",
    link: str = "hard",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write `out_dir` (manifest.json + shards) whose `split` holds every source's samples.

    Sources are never modified. Raises (and leaves no `out_dir`) on a missing split, a shard
    that disagrees with its manifest, or a sample key in two sources (naming both and the
    key). The dir is filled under a temp name beside `out_dir` and renamed when complete.
    """
    if link not in LINK_MODES:
        raise ValueError(f"link must be one of {LINK_MODES}, got {link!r}")
    if safe_key(split) != split:
        raise ValueError(f"split must match [A-Za-z0-9_-]+, got {split!r}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"out_dir {str(out)!r} exists; pass overwrite=True to replace it")
    planned = _plan(sources)
    for p in planned:
        if Path(p.source.shard_dir).resolve() == out.resolve():
            raise ValueError(f"out_dir {str(out)!r} is also a source")
    _check_keys(planned, progress)
    return write_dir_atomically(out, lambda tmp: _fill(tmp, planned, split, link, progress))
