"""The launch record: `<run_root>/<exp>/launch_record.json`, one entry per launch.

Read-modify-write under an flock, written atomically, so `launch.py status` and the
no-duplicate check see every job ever submitted for the experiment.
"""

from __future__ import annotations

import fcntl
import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from setokim.utils.io import atomic_write_json

RECORD_FILE = "launch_record.json"


def new_launch_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


@contextmanager
def _locked(exp_dir: Path) -> Iterator[None]:
    exp_dir.mkdir(parents=True, exist_ok=True)
    with open(exp_dir / ".launch_record.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_record(exp_dir: Path) -> dict[str, Any]:
    """The record, or an empty one when nothing was launched yet."""
    path = Path(exp_dir) / RECORD_FILE
    if not path.is_file():
        return {"launches": []}
    return json.loads(path.read_text(encoding="utf-8"))


def append_launch(exp_dir: Path, entry: dict[str, Any]) -> None:
    """Add one launch (with its jobs) to the record."""
    with _locked(exp_dir):
        record = read_record(exp_dir)
        record["launches"].append(entry)
        atomic_write_json(Path(exp_dir) / RECORD_FILE, record)


def latest_jobs(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """run_dir -> the newest submitted job for it (with launcher and launch_id added)."""
    latest: dict[str, dict[str, Any]] = {}
    for launch in record.get("launches", []):
        for job in launch.get("jobs", []):
            if job.get("job_id") is None:
                continue  # skipped: an older job was still active
            latest[job["run_dir"]] = {
                **job,
                "launcher": launch.get("launcher"),
                "launch_id": launch.get("launch_id"),
                "submitit_folder": launch.get("submitit_folder"),
            }
    return latest


def find_exp_dir(path: Path) -> Path:
    """An experiment dir from itself or one of its run dirs."""
    path = Path(path).absolute()
    for candidate in (path, path.parent):
        if (candidate / RECORD_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"RUN_DIR: no {RECORD_FILE} in {path} or its parent")
