"""Atomic writes for every package that builds on the tokenizer.

A killed job never leaves a half-written checkpoint, manifest or result under its final
name: files are written next to the target and moved into place with os.replace;
directories are filled under a temp name and renamed. (setok-eval keeps its own copy, since
it depends on none of the other packages by design.)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write_with(path: str | os.PathLike[str], write: Callable[[str], None]) -> Path:
    """Let `write(tmp_path)` produce the file, then move it to `path` in one step."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically write `data` to `path`."""
    return atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> Path:
    """Atomically write JSON (sorted keys, trailing newline) so diffs stay readable."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def write_dir_atomically(target: str | os.PathLike[str], fill: Callable[[Path], None]) -> Path:
    """Fill a temp directory next to `target`, then rename it into place.

    An existing directory is replaced only after the new one is complete.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"save directory {target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    old = target.parent / f".{target.name}.old-{tag}"
    tmp.mkdir()
    try:
        fill(tmp)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target
