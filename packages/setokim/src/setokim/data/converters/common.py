"""Shared writer for converters: real datasets -> the same shards + manifest as Shapes World.

What every converter gets from here, written once:
- `Records`: each source record is read inside `records.record(file, record_id)`; a missing
  field, a wrong type or an unreadable image becomes a `RecordError` naming the file, the
  record id and the field, or, with `skip_bad`, is counted and reported (never silently).
- `write_split`: every annotation's field types are checked (`SampleAnnotation.check_types`)
  before it is written; sample keys carry the split (`{split}-{key}`, unless they start with it), so keys stay unique
  across the splits of a folder; a folder holding the split already (or another source's
  data) is refused unless `overwrite` (which replaces the whole split); a failed conversion
  leaves nothing behind; the dataset card (counts, blind baselines) is rewritten.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from setokim.data.schema import SampleAnnotation
from setokim.data.shard_index import index_name
from setokim.data.shards import (
    MANIFEST_NAME,
    ShardInfo,
    ShardWriter,
    read_manifest,
    safe_key,
    write_manifest,
)

log = logging.getLogger("setokim.data.converters")


@dataclass
class Converted:
    """One output sample: the original image bytes (not re-encoded) and its annotation."""

    ann: SampleAnnotation
    image: bytes
    image_ext: str = "jpg"
    target: bytes | None = None
    target_ext: str = "jpg"


def image_ext(path: str | Path) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in ("jpg", "jpeg", "png", "webp"):
        raise ValueError(f"image {str(path)!r}: extension must be jpg/jpeg/png/webp")
    return "jpg" if ext == "jpeg" else ext


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header only; ValueError when the bytes are no image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"not a readable image: {exc}") from exc


def read_image(path: str | Path) -> tuple[bytes, str, int, int]:
    """(bytes, ext, width, height) of an image file; FileNotFoundError names the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file {str(p)!r} does not exist")
    data = p.read_bytes()
    try:
        w, h = image_size(data)
    except ValueError as exc:
        raise ValueError(f"image file {str(p)!r}: {exc}") from None
    return data, image_ext(p), w, h


class RecordError(ValueError):
    """One source record is bad: names the file, the record id and the field."""

    def __init__(self, file: str | Path, record: object, reason: str) -> None:
        self.file, self.record, self.reason = str(file), record, reason
        super().__init__(f"{self.file}: record {record!r}: {reason}")


def record_reason(exc: BaseException) -> str:
    """An exception raised while checking a record, as the reason a RecordError gives."""
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}" if exc.args else "missing field"
    if type(exc) in (ValueError, TypeError):  # the checks' own messages name the field
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class Records:
    """The record context of a conversion: errors name file, record and field; `skip_bad`
    counts and reports bad records instead of failing (never silently)."""

    def __init__(self, skip_bad: bool = False) -> None:
        self.skip_bad = skip_bad
        self.skipped: list[str] = []

    @contextmanager
    def record(self, file: str | Path, record_id: object) -> Iterator[None]:
        """Run the body for one record; its errors become RecordErrors (or are skipped)."""
        try:
            yield
        except RecordError as err:
            self._bad(err)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OSError) as exc:
            self._bad(RecordError(file, record_id, record_reason(exc)))

    def _bad(self, err: RecordError) -> None:
        if not self.skip_bad:
            raise err
        self.skipped.append(str(err))
        log.warning("skipping bad record (%d so far): %s", len(self.skipped), err)

    def report(self) -> dict[str, Any]:
        """What the manifest's info records about skipped records (the first 20 named)."""
        return {"skipped_records": len(self.skipped), "skipped_examples": self.skipped[:20]}


def load_json(path: str | Path | None) -> Any:
    """An annotation file; errors name the file (and the line of a JSON syntax error)."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"annotation file {str(p)!r} does not exist")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"annotation file {str(p)!r} is not valid JSON: {exc}") from None


def require(
    record: dict[str, Any], name: str, kind: type | tuple[type, ...], *, prefix: str = ""
) -> Any:
    """`record[name]` checked against the official type (KeyError / TypeError name it as
    `prefix + name`, e.g. "image.width")."""
    if not isinstance(record, dict):
        where = f"{prefix.rstrip('.')} " if prefix else "record "
        raise TypeError(f"{where}must be a JSON object, got {type(record).__name__}")
    if name not in record:
        raise KeyError(f"{prefix}{name}")
    value = record[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = "/".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise TypeError(
            f"field {prefix + name!r}: expected {names}, got {type(value).__name__} {value!r:.60}"
        )
    return value


def optional(
    record: dict[str, Any], name: str, kind: type | tuple[type, ...], *, prefix: str = ""
) -> Any:
    """`record[name]` when the record has it (checked like `require`), else None."""
    if isinstance(record, dict) and name not in record:
        return None
    return require(record, name, kind, prefix=prefix)


def numbers(value: Any, count: int, name: str) -> list[float]:
    """A list of `count` JSON numbers (a box, a size), or ValueError naming the field."""
    if (
        not isinstance(value, list)
        or len(value) != count
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"field {name!r}: expected a list of {count} numbers, got {value!r:.60}")
    return value


def _check_target(out: Path, split: str, source: str, overwrite: bool) -> dict[str, Any] | None:
    """The folder's manifest (None: a new folder); refuses what would replace or mix data."""
    if not (out / MANIFEST_NAME).is_file():
        if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise FileExistsError(
                f"out_dir {str(out)!r} is not empty and holds no {MANIFEST_NAME}: not a shard "
                "folder; convert into a new folder"
            )
        return None
    previous = read_manifest(out)
    sources = split_sources(previous)
    others = {s: src for s, src in sources.items() if s != split and src != source}
    if others:
        raise FileExistsError(
            f"out_dir {str(out)!r} holds {others} data; a folder holds one source (write "
            f"{source} into its own folder and combine them with tools/data/merge_shards.py)"
        )
    if split in previous["splits"] and not overwrite:
        n = previous["splits"][split]["num_samples"]
        raise FileExistsError(
            f"out_dir {str(out)!r} already holds split {split!r} ({sources.get(split)}, {n} "
            "samples); pass --overwrite (overwrite=True) to replace the whole split"
        )
    return previous


def split_sources(manifest: dict[str, Any]) -> dict[str, str]:
    """split -> source of a manifest (older manifests record one source for all splits)."""
    info = manifest.get("info", {})
    per = info.get("split_sources") or {}
    return {s: str(per.get(s, info.get("source", "unknown"))) for s in manifest["splits"]}


def write_split(
    out_dir: str | Path,
    split: str,
    samples: Iterable[Converted],
    *,
    source: str,
    samples_per_shard: int = 1000,
    progress: bool = False,
    info: dict[str, Any] | None = None,
    overwrite: bool = False,
    records: Records | None = None,
) -> dict[str, Any]:
    """Write `samples` as `{split}-NNNNNN.tar` and add the split to manifest.json.

    Refused (before anything is read) when `out_dir` holds the split already (unless
    `overwrite`), another source's data, or files that are not a shard folder. Keys become
    `{split}-{key}`; every annotation's types are checked first. The shards are written into
    a hidden staging folder and moved into place only once every sample converted; a
    replaced split is first dropped from the manifest, so a reader sees the old split, no
    split, or the new one, never a mix. A failed conversion leaves the folder as it was (a
    folder it created is removed). Then the dataset card is rewritten for every split.
    """
    if safe_key(split) != split:
        raise ValueError(f"split must match [A-Za-z0-9_-]+, got {split!r}")
    out = Path(out_dir)
    previous = _check_target(out, split, source, overwrite)
    records = records or Records()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=f".{split}.staging-"))
    anns: list[SampleAnnotation] = []
    try:
        if progress:
            from tqdm import tqdm

            samples = tqdm(samples, desc=f"{source}/{split}", unit="img")
        writer = ShardWriter(staging, split, samples_per_shard)
        for s in samples:
            with records.record(f"{source} sample", s.ann.key):
                if not s.ann.key.startswith(f"{split}-"):
                    s.ann.key = safe_key(f"{split}-{s.ann.key}")
                s.ann.check_types()
                files = {s.image_ext: s.image, "json": s.ann.to_json()}
                if s.target is not None:
                    files[f"target.{s.target_ext}"] = s.target
                writer.write(s.ann.key, files)
                anns.append(s.ann)
        shards = writer.close()
        if not shards:
            raise ValueError(
                f"{source}/{split}: no sample converted"
                + (f" ({len(records.skipped)} bad records skipped)" if records.skipped else "")
            )
        if previous is not None and split in previous["splits"]:
            _drop_split(out, previous, split)
        for shard in shards:
            for name in (shard.name, index_name(shard.name)):
                if (staging / name).exists():
                    os.replace(staging / name, out / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    splits = {}
    if previous is not None:
        splits = {
            k: [ShardInfo(**s) for s in v["shards"]]
            for k, v in previous["splits"].items()
            if k != split
        }
    splits[split] = shards
    merged = dict(previous["info"]) if previous else {}
    merged.update({"source": source, **(info or {})})
    merged["split_sources"] = {**(split_sources(previous) if previous else {}), split: source}
    merged.setdefault("skipped_records", {})
    merged["skipped_records"] = {**merged["skipped_records"], split: len(records.skipped)}
    manifest = write_manifest(out, splits, merged)
    if previous is not None and split in previous["splits"]:
        kept = {s.name for s in shards}
        for old in previous["splits"][split]["shards"]:
            if old["name"] not in kept:
                (out / old["name"]).unlink(missing_ok=True)
                (out / index_name(old["name"])).unlink(missing_ok=True)
    write_converted_card(out, manifest, {split: anns}, title=source)
    if records.skipped:
        log.warning("%s/%s: %d bad record(s) skipped", source, split, len(records.skipped))
    return manifest


def _drop_split(out: Path, previous: dict[str, Any], split: str) -> None:
    """Rewrite the manifest without `split` (before its shards are replaced)."""
    rest = {
        k: [ShardInfo(**s) for s in v["shards"]]
        for k, v in previous["splits"].items()
        if k != split
    }
    write_manifest(out, rest, dict(previous["info"]))


def write_converted_card(
    out: Path,
    manifest: dict[str, Any],
    fresh: dict[str, list[SampleAnnotation]],
    *,
    title: str,
) -> None:
    """dataset_card.json + README.md over every split of `out` (the blind baselines are
    fitted on train); splits not in `fresh` are read back from their shards (.json only)."""
    from setokim.data.card import build_card, write_card
    from setokim.data.shards import iter_tar_samples

    per_split: dict[str, list[SampleAnnotation]] = {}
    for split, body in manifest["splits"].items():
        if split in fresh:
            per_split[split] = fresh[split]
            continue
        per_split[split] = [
            SampleAnnotation.from_json(files["json"])
            for s in body["shards"]
            for _, files in iter_tar_samples(out / s["name"], read=lambda ext: ext == "json")
            if "json" in files
        ]
    info = dict(manifest["info"]) | {"version": manifest["version"], "title": title}
    write_card(out, build_card(per_split, info))


def add_write_arguments(parser: Any) -> None:
    """The command-line options every converter tool shares (argparse)."""
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the split if OUT already holds it"
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip (count and report) records that break the official schema instead of failing",
    )


@contextmanager
def tool_errors() -> Iterator[None]:
    """A converter tool's bad input ends in one line naming what was wrong (exit status 1)."""
    try:
        yield
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None


def summary(manifest: dict[str, Any], split: str, out: str | Path) -> str:
    """The line a converter tool prints: samples written, and bad records skipped."""
    line = f"{split}: {manifest['splits'][split]['num_samples']} samples -> {out}"
    skipped = manifest.get("info", {}).get("skipped_records", {}).get(split, 0)
    return line + (f" ({skipped} bad records skipped; see the warnings)" if skipped else "")
