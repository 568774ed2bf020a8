"""Deterministic webdataset tar shards, their task-index sidecars and their manifest.

Tar members carry fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644) and are
written in call order, so the same samples always give byte-identical shards. Each shard is
written atomically when it is complete; `manifest.json` records counts and sha256 per shard.

Next to each shard `X.tar` the writer puts its task-index sidecar (`setokim.data.shard_index`).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from webdataset.tariterators import base_plus_ext

from setokim.data.shard_index import (
    IndexRow,
    annotation_counts,
    annotation_of,
    index_name,
    write_shard_index,
)
from setokim.utils.io import atomic_write_bytes, atomic_write_json

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "setok-shards-1"
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class ShardInfo:
    name: str
    num_samples: int
    sha256: str
    bytes: int
    first_key: str
    last_key: str


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


class ShardWriter:
    """Write samples ``{key}.{ext}`` into ``{split}-NNNNNN.tar`` of `samples_per_shard` each.

    With `index` (default) each finished shard gets its sidecar index (`index_name`).
    """

    def __init__(
        self, out_dir: str | Path, split: str, samples_per_shard: int = 1000, *, index: bool = True
    ) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.index = index
        self.shards: list[ShardInfo] = []
        self._buf: io.BytesIO | None = None
        self._tar: tarfile.TarFile | None = None
        self._keys: list[str] = []
        self._rows: list[IndexRow] = []
        self._seen: set[str] = set()

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Add one sample; `files` maps extension ("png", "json", "target.png") to bytes."""
        if not _KEY_RE.match(key) or "." in key:
            raise ValueError(f"key must match [A-Za-z0-9_-]+, got {key!r}")
        if key in self._seen:
            raise ValueError(f"duplicate sample key {key!r}")
        if not files:
            raise ValueError(f"sample {key!r} has no files")
        self._seen.add(key)
        if self._tar is None:
            self._buf = io.BytesIO()
            self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.USTAR_FORMAT)
        for ext in sorted(files):
            self._tar.addfile(*_member(f"{key}.{ext}", files[ext]))
        self._keys.append(key)
        if self.index:
            self._rows.append((key, *annotation_counts(annotation_of(files))))
        if len(self._keys) >= self.samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        if self._tar is None or self._buf is None:
            return
        self._tar.close()
        data = self._buf.getvalue()
        name = shard_name(self.split, len(self.shards))
        sha = hashlib.sha256(data).hexdigest()
        # an old sidecar goes first and the new one follows the shard: a crash in between
        # leaves a shard without sidecar (scanned), never one with another shard's sidecar
        (self.out_dir / index_name(name)).unlink(missing_ok=True)
        atomic_write_bytes(self.out_dir / name, data)
        if self.index:
            write_shard_index(self.out_dir / name, sha, len(data), self._rows)
        self.shards.append(
            ShardInfo(name, len(self._keys), sha, len(data), self._keys[0], self._keys[-1])
        )
        self._tar, self._buf, self._keys, self._rows = None, None, [], []

    def close(self) -> list[ShardInfo]:
        """Flush the last partial shard and return every shard written."""
        self._flush()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()


def write_manifest(
    out_dir: str | Path, splits: dict[str, list[ShardInfo]], info: dict[str, Any]
) -> dict[str, Any]:
    """Write manifest.json; `version` is a hash of the shard hashes (the data version)."""
    body = {
        split: {
            "num_samples": sum(s.num_samples for s in shards),
            "shards": [asdict(s) for s in shards],
        }
        for split, shards in splits.items()
    }
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    manifest = {"format": MANIFEST_FORMAT, "version": digest, "splits": body, "info": info}
    atomic_write_json(Path(out_dir) / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Load and sanity-check manifest.json; raises FileNotFoundError/ValueError clearly."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"shard_dir {str(shard_dir)!r} has no {MANIFEST_NAME}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(
            f"{path}: format must be {MANIFEST_FORMAT!r}, got {manifest.get('format')!r}"
        )
    return manifest


def dataset_version(shard_dir: str | Path) -> str:
    """The data version recorded in the manifest (changes whenever any shard changes)."""
    return str(read_manifest(shard_dir)["version"])


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_key(text: str) -> str:
    """A shard-safe sample key from any string (file names, ids): other chars become '_'."""
    out = re.sub(r"[^A-Za-z0-9_\-]", "_", text)
    if not out:
        raise ValueError("key must not be empty")
    return out


# webdataset skips members named like "__meta__" (and "__x__/..."): never part of a sample
_META_RE = re.compile(r"__[^/]*__($|/)")


def iter_tar_groups(
    path: str | Path, read: Callable[[str, str], bool] | None = None
) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """(key, [(ext, bytes), ...]) per sample of an uncompressed tar, in tar order: the one tar
    reader of setokim. Members are grouped by key exactly as the webdataset loader groups
    them (consecutive members with the same base name; directories, links and "__x__" meta
    members skipped). Only members that `read(key, ext)` accepts (all when None) are read; tarfile seeks past
    the others, so a sample none of whose members is read costs its headers alone and comes
    out as (key, []). A member cut short by the end of the file raises tarfile.ReadError
    whether it is read or skipped (tarfile checks the end of each skipped member).
    """
    key: str | None = None
    members: list[tuple[str, bytes]] = []
    with tarfile.open(path, mode="r:") as tar:
        while (member := tar.next()) is not None:
            tar.members.clear()  # tarfile keeps every header it saw; a big shard needs none
            if not member.isreg() or _META_RE.match(member.name):
                continue
            prefix, ext = base_plus_ext(member.name)
            if prefix is None:
                continue
            if prefix != key:
                if key is not None:
                    yield key, members
                key, members = prefix, []
            if read is None or read(prefix, ext):
                f = tar.extractfile(member)
                members.append((ext, f.read() if f is not None else b""))
    if key is not None:
        yield key, members


def raw_sample(key: str, shard: str, members: list[tuple[str, bytes]]) -> dict[str, Any]:
    """webdataset's sample dict of one `iter_tar_groups` group: extensions lower-cased,
    `__key__` and `__url__` (the shard's name); a file given twice is an error."""
    raw: dict[str, Any] = {"__key__": key, "__url__": shard}
    for ext, data in members:
        ext = ext.lower()
        if ext in raw:
            raise ValueError(f"{key}.{ext}: duplicate file name in the tar")
        raw[ext] = data
    return raw


def iter_tar_samples(
    path: str | Path, read: Callable[[str], bool] = lambda ext: True
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of `iter_tar_groups`, reading only the members whose
    extension `read(ext)` accepts (keys alone cost headers)."""
    for key, members in iter_tar_groups(path, lambda _key, ext: read(ext)):
        yield key, dict(members)
