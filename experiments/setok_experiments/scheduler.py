"""Is a job still queued or running? SLURM (squeue, then sacct) or a local pid."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

# squeue/sacct states of a job that still holds (or will hold) its run dir.
ACTIVE_SLURM_STATES = frozenset(
    {
        "PENDING",
        "RUNNING",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "CONFIGURING",
        "COMPLETING",
        "SUSPENDED",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "SPECIAL_EXIT",
        "RESV_DEL_HOLD",
    }
)


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def slurm_states(job_ids: Sequence[str]) -> dict[str, str]:
    """job id ("123" or array task "123_4") -> state; "UNKNOWN" when SLURM does not know."""
    ids = [str(j) for j in job_ids]
    states: dict[str, str] = {}
    if not ids:
        return states
    # sacct is authoritative (it says COMPLETED while squeue may still say COMPLETING);
    # squeue fills in jobs that accounting has not recorded yet.
    out = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(ids)])
    for line in (out or "").splitlines():
        parts = line.split("|")
        if len(parts) >= 2:
            states[parts[0]] = parts[1].split()[0] if parts[1] else "UNKNOWN"
    # All of this user's jobs: `squeue -j` fails outright when one id has left the queue.
    out = _run(["squeue", "--me", "-h", "-r", "-o", "%i|%T"])
    wanted = set(ids)
    for line in (out or "").splitlines():
        parts = line.split("|")
        if len(parts) == 2 and parts[0] in wanted and states.get(parts[0], "UNKNOWN") == "UNKNOWN":
            states[parts[0]] = parts[1]
    return {j: states.get(j, "UNKNOWN") for j in ids}


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists here and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(") ", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
