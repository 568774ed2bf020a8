"""Run planned jobs: in this process (inline), or as ONE submitit job array (local / SLURM)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from setok_experiments.job import JobSpec, LaneJob, TrainJob, short_error
from setok_experiments.paths import EXPERIMENTS_DIR
from setok_experiments.schema import ClusterConfig, LauncherConfig


@dataclass
class Outcome:
    """What became of one job (inline at once; submitit ones after `wait`)."""

    job_id: str
    state: str  # COMPLETED | PREEMPTED | FAILED | INTERRUPTED | RUNNING | PENDING | ...
    result: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class Submission:
    job_id: str
    job: Any = None  # submitit.Job for local/slurm
    outcome: Outcome | None = None  # inline jobs have run already
    extra: dict[str, Any] = field(default_factory=dict)


def _job_import_path() -> None:
    # The job process unpickles setok_experiments.job.TrainJob: make it importable there
    # (local subprocesses and sbatch both inherit this environment).
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(EXPERIMENTS_DIR) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(EXPERIMENTS_DIR), *parts])


def run_inline(specs: Sequence[JobSpec], job_ids: Sequence[str]) -> list[Submission]:
    """One after another in this process; a failing job does not stop the next."""
    out = []
    for spec, job_id in zip(specs, job_ids, strict=True):
        try:
            result = TrainJob()(spec)
            outcome = Outcome(job_id, result["state"], result=result)
        except KeyboardInterrupt:
            out.append(Submission(job_id, outcome=Outcome(job_id, "INTERRUPTED")))
            raise
        except Exception as err:  # noqa: BLE001 — reported per job, like a cluster would
            outcome = Outcome(job_id, "FAILED", error=short_error(err))
        out.append(Submission(job_id, outcome=outcome))
    return out


def slurm_parameters(cluster: ClusterConfig, job_name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters from a cluster profile (one task per GPU)."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": cluster.time_min,
        "nodes": cluster.nodes,
        "ntasks_per_node": cluster.tasks_per_node,
        "cpus_per_task": cluster.cpus_per_task,
        "signal_delay_s": cluster.signal_delay_s,
        "array_parallelism": cluster.array_parallelism,
        "setup": list(cluster.setup),
        "stderr_to_stdout": True,
    }
    if cluster.gpus_per_node:
        params["gpus_per_node"] = cluster.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(cluster, key)
        if value:
            params[key] = value
    if cluster.mem_gb is not None:
        params["mem"] = f"{max(1, round(cluster.mem_gb * 1024))}MB"
    if cluster.additional:
        params["additional_parameters"] = dict(cluster.additional)
    return params


def submit_array(
    kind: str,
    specs: Sequence[JobSpec],
    folder: Path,
    launcher: LauncherConfig,
    cluster: ClusterConfig,
    job_name: str,
) -> list[Submission]:
    """Submit all specs as one submitit array (`map_array`); returns one Submission each."""
    import submitit

    _job_import_path()
    log_folder = str(folder / "%j")
    if kind == "slurm":
        executor: Any = submitit.SlurmExecutor(
            folder=log_folder, max_num_timeout=cluster.max_num_timeout
        )
        executor.update_parameters(**slurm_parameters(cluster, job_name))
    elif kind == "local":
        executor = submitit.LocalExecutor(folder=log_folder)
        lanes = local_lanes(len(specs), launcher.array_parallelism)
        # A lane's wall limit covers every job in it.
        longest = max(len(lane) for lane in lanes)
        executor.update_parameters(timeout_min=launcher.timeout_min * longest, tasks_per_node=1)
        jobs = executor.map_array(LaneJob(), [[specs[i] for i in lane] for lane in lanes])
        subs: dict[int, Submission] = {}
        for job, lane in zip(jobs, lanes, strict=True):
            for pos, i in enumerate(lane):
                subs[i] = Submission(str(job.job_id), job=job, extra={"lane_pos": pos})
        return [subs[i] for i in range(len(specs))]
    else:
        raise ValueError(f"kind: expected 'local' or 'slurm', got {kind!r}")
    jobs = executor.map_array(TrainJob(), list(specs))
    return [Submission(str(job.job_id), job=job) for job in jobs]


def local_lanes(count: int, parallelism: int | None) -> list[list[int]]:
    """Job indices per local lane: at most `parallelism` lanes (None: the CPU cores),
    dealt round-robin so the lanes are even."""
    width = max(1, min(count, parallelism or os.cpu_count() or 1))
    return [list(range(start, count, width)) for start in range(width)]


def wait(submissions: Sequence[Submission], timeout_s: float, poll_s: float) -> list[Outcome]:
    """Block until every job is done or `timeout_s` passes; never waits unboundedly."""
    from tqdm import tqdm

    deadline = time.monotonic() + timeout_s
    pending = [s for s in submissions if s.outcome is None]
    with tqdm(total=len(pending), desc="jobs done", disable=not pending) as bar:
        while pending and time.monotonic() < deadline:
            still = [s for s in pending if not s.job.done()]
            bar.update(len(pending) - len(still))
            pending = still
            if pending:
                time.sleep(poll_s)
    outcomes = []
    for sub in submissions:
        if sub.outcome is not None:
            outcomes.append(sub.outcome)
        elif sub in pending:
            outcomes.append(Outcome(sub.job_id, f"{sub.job.state} (still running at timeout)"))
        else:
            outcomes.append(_finished(sub))
    return outcomes


def _finished(sub: Submission) -> Outcome:
    try:
        result = sub.job.results()[0]  # rank 0's (a multi-node job has one per task)
    except Exception as err:  # noqa: BLE001 — submitit re-raises the job's failure
        message = str(err).strip().splitlines()
        return Outcome(sub.job_id, "FAILED", error=message[-1] if message else repr(err))
    if "lane_pos" in sub.extra:
        result = result[sub.extra["lane_pos"]]
    if result.get("state") == "FAILED":
        return Outcome(sub.job_id, "FAILED", error=result.get("error"))
    return Outcome(sub.job_id, result.get("state", "COMPLETED"), result=result)
