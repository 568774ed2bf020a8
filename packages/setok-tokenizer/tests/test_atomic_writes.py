"""Atomic writes: a failure mid-write leaves the previous file or directory untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from setok_tokenizer.atomic import atomic_write_json, atomic_write_with, write_dir_atomically


def test_failed_file_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    atomic_write_json(target, {"a": 1})

    def broken(tmp: str) -> None:
        Path(tmp).write_text("{half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write_with(target, broken)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_failed_directory_fill_keeps_the_old_directory(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    write_dir_atomically(target, lambda d: (d / "w.bin").write_bytes(b"old"))

    def broken(d: Path) -> None:
        (d / "w.bin").write_bytes(b"ne")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_dir_atomically(target, broken)
    assert (target / "w.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    write_dir_atomically(target, lambda d: (d / "w.bin").write_bytes(b"new"))
    assert (target / "w.bin").read_bytes() == b"new"
