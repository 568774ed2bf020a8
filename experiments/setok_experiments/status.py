"""`launch.py status PATH`: what became of an earlier launch.

Per run dir: the newest job id (launch record), the scheduler's state (sacct/squeue for
SLURM, the pid for local), the job's own status file, the newest checkpoint step and the
last logged loss.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

from setok_experiments.job import read_status
from setok_experiments.record import find_exp_dir, latest_jobs, read_record
from setok_experiments.scheduler import pid_alive, slurm_states

_STEP = re.compile(r"step_(\d+)$")


def checkpoint_step(run_dir: Path) -> int | None:
    """Step of the newest complete checkpoint in the run dir (None without one)."""
    from setokim.train import latest_checkpoint

    path = latest_checkpoint(run_dir)
    if path is None:
        return None
    match = _STEP.search(Path(path).name)
    return int(match.group(1)) if match else None


def last_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The newest metrics record that carries a loss."""
    from setokim.train.metrics import METRICS_FILE

    path = run_dir / METRICS_FILE
    if not path.is_file():
        return None
    for line in reversed(path.read_text(encoding="utf-8").splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        if "loss" in record:
            return record
    return None


def run_state(status: dict[str, Any], host: str) -> str:
    """The job status file's state; a RUNNING job of this host whose process is gone (killed
    with -9, the machine rebooted) is DIED. SLURM jobs are judged by the scheduler column."""
    state = str(status.get("state", "NOT STARTED"))
    if state != "RUNNING" or status.get("slurm_job_id") is not None:
        return state
    if status.get("host") != host:
        return f"RUNNING (on {status.get('host')}: not checked from here)"
    pid = int(status.get("pid", -1))
    return state if pid_alive(pid) else f"DIED (pid {pid} is gone; relaunch to resume)"


def collect(path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Status rows for every run dir of the experiment (or just the one given)."""
    path = Path(path).absolute()
    exp_dir = find_exp_dir(path)
    latest = latest_jobs(read_record(exp_dir))
    if path != exp_dir:
        if str(path) not in latest:
            raise FileNotFoundError(f"RUN_DIR: {path} was never launched from {exp_dir}")
        latest = {str(path): latest[str(path)]}
    slurm_ids = [j["job_id"] for j in latest.values() if j.get("launcher") == "slurm"]
    states = slurm_states(slurm_ids) if slurm_ids else {}
    host = socket.gethostname()
    rows = []
    for run_dir, job in sorted(latest.items(), key=lambda kv: kv[1].get("index", 0)):
        status = read_status(run_dir) or {}
        if job["launcher"] == "slurm":
            sched = states.get(job["job_id"], "UNKNOWN")
        elif job["launcher"] == "local" and job.get("host") == host:
            sched = "RUNNING" if pid_alive(int(job["job_id"])) else "EXITED"
        else:
            sched = "-"
        metrics = last_metrics(Path(run_dir)) or {}
        rows.append(
            {
                "index": job.get("index"),
                "name": job.get("name"),
                "job_id": job["job_id"],
                "launcher": job["launcher"],
                "scheduler_state": sched,
                "run_state": run_state(status, host),
                "attempts": status.get("attempts", 0),
                "checkpoint_step": checkpoint_step(Path(run_dir)),
                "step": metrics.get("step"),
                "loss": metrics.get("loss"),
                "error": status.get("error"),
                "error_log": status.get("error_log"),
                "run_dir": run_dir,
            }
        )
    return exp_dir, rows
