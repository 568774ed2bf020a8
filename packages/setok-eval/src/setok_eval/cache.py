"""Append-only prediction cache: one JSONL file per rank, one fsynced line per prediction.

A killed job loses nothing already written (each line is flushed and fsynced as it is made),
and a resumed job duplicates nothing (it skips keys already present). A line torn by a kill is
ignored on read and cut off before the next append.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from setok_eval.io import stable_hash


def prediction_key(
    task_name: str,
    task_version: str,
    doc_id: str,
    prompt: str,
    generation: Mapping[str, Any],
    model_fingerprint: str,
) -> str:
    """Cache key: everything that, when changed, must produce a new prediction."""
    return stable_hash(
        {
            "task": task_name,
            "version": task_version,
            "doc": doc_id,
            "prompt": prompt,
            "generation": dict(generation),
            "model": model_fingerprint,
        },
        length=32,
    )


class PredictionCache:
    """The cache folder of one task; this process appends to its own rank's file."""

    def __init__(self, folder: str | os.PathLike[str], rank: int = 0) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"rank{rank:05d}.jsonl"
        self.torn_lines = 0

    def repair(self) -> int:
        """Cut a torn (newline-less) tail off this rank's file; returns the bytes removed."""
        if not self.path.exists():
            return 0
        with open(self.path, "rb+") as handle:
            data = handle.read()
            if not data or data.endswith(b"\n"):
                return 0
            keep = data.rfind(b"\n") + 1
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
        return len(data) - keep

    def load(self) -> dict[str, dict[str, Any]]:
        """All complete records of all ranks, by key (first occurrence wins)."""
        records: dict[str, dict[str, Any]] = {}
        self.torn_lines = 0
        for f in sorted(self.folder.glob("rank*.jsonl")):
            with open(f, encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    if not line.endswith("\n"):
                        self.torn_lines += 1
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        self.torn_lines += 1
                        continue
                    if isinstance(rec, dict) and "key" in rec:
                        records.setdefault(rec["key"], rec)
        return records

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record as a line, flushed and fsynced before returning."""
        if "key" not in record:
            raise ValueError("record needs a 'key'")
        line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
