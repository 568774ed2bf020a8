"""Deterministic run directories and what each one records about its launch.

`runs/<exp>/<hash>/` where hash = sha256 of the sorted canonical identity overrides, so the
same experiment with the same overrides (in any order) always lands in the same directory,
and a relaunch resumes from the checkpoint there.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from setok_experiments.paths import REPO_ROOT
from setokim.utils.io import atomic_write_json, atomic_write_text

HASH_LEN = 12
META_FILE = "launch_meta.json"
DIFF_FILE = "git_diff.patch"


def override_hash(identity: Sequence[str]) -> str:
    """Stable short hash of canonical, sorted override lines."""
    text = "\n".join(sorted(identity))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:HASH_LEN]


def run_dir_for(run_root: str | Path, exp: str, identity: Sequence[str]) -> Path:
    """Absolute run dir (a relative `run_root` is taken from the current directory)."""
    return (Path(run_root) / exp / override_hash(identity)).absolute()


def unwritable(path: Path) -> str | None:
    """Why run dirs cannot be created under `path` (None when they can): checked at launch,
    before any compute, instead of failing on the first write after training."""
    probe = Path(path).absolute()
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    try:  # read-only mounts and ACLs that os.access does not see
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        return f"cannot create a file in {probe}: {err.strerror or err}"
    return None


def exp_dir_for(run_root: str | Path, exp: str) -> Path:
    return (Path(run_root) / exp).absolute()


@dataclass(frozen=True)
class SourceState:
    """Which code a launch ran: git commit, uncommitted diff, lockfile hash."""

    git_sha: str | None
    git_dirty: bool
    git_diff: str
    untracked: list[str]
    uv_lock_sha256: str | None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def source_state() -> SourceState:
    """Read-only git queries plus the uv.lock hash (None where unavailable)."""
    sha = _git("rev-parse", "HEAD")
    diff = _git("diff", "HEAD", "--binary") or ""
    status = _git("status", "--porcelain", "--untracked-files=all") or ""
    untracked = [line[3:] for line in status.splitlines() if line.startswith("??")]
    lock = REPO_ROOT / "uv.lock"
    lock_hash = hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else None
    return SourceState(
        git_sha=sha.strip() if sha else None,
        git_dirty=bool(diff.strip()) or bool(untracked),
        git_diff=diff,
        untracked=untracked,
        uv_lock_sha256=lock_hash,
    )


def _what_trains(config_yaml: str) -> Any:
    """The config without `launcher` (inline, local or SLURM trains the same run)."""
    import yaml

    try:
        loaded = yaml.safe_load(config_yaml)
    except yaml.YAMLError:
        return config_yaml  # an unreadable old config counts as different
    if isinstance(loaded, dict):
        loaded.pop("launcher", None)
    return loaded


def write_run_metadata(
    run_dir: Path,
    *,
    config_yaml: str,
    exp: str,
    name: str,
    overrides: Sequence[str],
    identity: Sequence[str],
    source: SourceState,
    command: Sequence[str],
    launcher: str,
) -> bool:
    """Write config.yaml, launch_meta.json and git_diff.patch atomically.

    Returns True when the run dir already held a config that trains differently (the old
    one is kept as config.<time>.yaml so the change stays visible); the launcher alone does
    not count.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    changed = config_path.is_file() and _what_trains(
        config_path.read_text(encoding="utf-8")
    ) != _what_trains(config_yaml)
    if changed:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        atomic_write_text(run_dir / f"config.{stamp}.yaml", config_path.read_text("utf-8"))
    atomic_write_text(config_path, config_yaml)
    meta: dict[str, Any] = {
        "exp": exp,
        "name": name,
        "overrides": list(overrides),
        "identity": list(identity),
        "hash": override_hash(identity),
        "git_sha": source.git_sha,
        "git_dirty": source.git_dirty,
        "untracked": source.untracked,
        "uv_lock_sha256": source.uv_lock_sha256,
        "command": list(command),
        "python": sys.executable,
        "host": socket.gethostname(),
        "launcher": launcher,
        "time": time.time(),
    }
    atomic_write_json(run_dir / META_FILE, meta)
    if source.git_diff:
        atomic_write_text(run_dir / DIFF_FILE, source.git_diff)
    else:
        (run_dir / DIFF_FILE).unlink(missing_ok=True)
    return changed
