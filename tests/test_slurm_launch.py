"""The launcher against the real dev SLURM cluster (slurm/dev-cluster/up.sh).

Skipped when the cluster is not up, except under CI=true (then they fail).
Each test has its own run_root (so its own submitit folder): job ids restart at 1 when the
cluster state is wiped, and a shared folder could hand a test an older job's result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from setok_experiments.cli import main
from setok_experiments.job import read_status
from setok_experiments.record import latest_jobs, read_record
from setok_experiments.scheduler import slurm_states

pytestmark = pytest.mark.slurm

SLURM = ["launcher=slurm", "cluster=dev", "launcher.poll_s=1", "launcher.wait_timeout_min=8"]


def _cluster_up() -> bool:
    if shutil.which("scontrol") is None or shutil.which("sacct") is None:
        return False
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
        acct = subprocess.run(["sacct", "-n", "-X"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return ping.returncode == 0 and "UP" in ping.stdout and acct.returncode == 0


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster() -> None:
    if not _cluster_up():
        message = "dev SLURM cluster not up (run slurm/dev-cluster/up.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(autouse=True)
def _restore_pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    # The launcher prepends experiments/ to PYTHONPATH for its jobs; undo it after each test.
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))


def _jobs(exp_dir: Path) -> dict[str, dict[str, Any]]:
    return latest_jobs(read_record(exp_dir))


def _wait_for(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def test_toy_array_runs_to_completion_through_sbatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    args = ["+exp=smoke_toy", f"run_root={root}", "trainer.max_steps=4", *SLURM, "--wait"]
    assert main(args) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    jobs = _jobs(root / "smoke_toy")
    assert len(jobs) == 2
    ids = [j["job_id"] for j in jobs.values()]
    assert len({i.split("_")[0] for i in ids}) == 1, "one array, not two jobs"
    # The result pickle can appear before SLURM marks the job finished: poll accounting.
    _wait_for(lambda: set(slurm_states(ids).values()) == {"COMPLETED"}, 60, f"sacct {ids}")
    for run_dir in jobs:
        status = read_status(run_dir)
        assert status is not None and status["state"] == "COMPLETED" and status["step"] == 4
        assert status["slurm_job_id"] in ids
    assert out.count("COMPLETED") == 2


def test_ablation_array_runs_to_completion_through_sbatch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    # Two Table 5 rows (each the SeTokIM pipeline at budget=smoke) as one array, then the
    # report job that SLURM starts after the array (afterany), without --wait.
    args = [
        "+exp=ablation_clustering",
        f"run_root={root}",
        "--only",
        "dynamic_hard,fixed_8",
        "budget=smoke",
        "wandb=disabled",
        *SLURM,
    ]
    assert main(args) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    exp = root / "ablation_clustering"
    jobs = _jobs(exp)
    assert sorted(j["name"] for j in jobs.values()) == ["dynamic_hard", "fixed_8"]
    ids = [j["job_id"] for j in jobs.values()]
    report_id = out.split("report job ", 1)[1].split(":", 1)[0]
    assert "_" not in report_id and report_id != ids[0].split("_")[0]
    done = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}
    _wait_for(lambda: set(slurm_states([report_id]).values()) <= done, 900, "the report job")
    assert set(slurm_states(ids).values()) == {"COMPLETED"}
    assert slurm_states([report_id]) == {report_id: "COMPLETED"}
    for run_dir in jobs:
        assert read_status(run_dir)["state"] == "COMPLETED"  # type: ignore[index]
        assert (Path(run_dir) / "row.json").is_file()
    md = (exp / "report" / "table.md").read_text()
    assert "dynamic_hard (baseline)" in md and "fixed_8" in md


def _start_slow_toy(root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, Path]:
    """One toy job of 40 slow steps (checkpoint every 4), submitted without waiting."""
    args = [
        "+exp=smoke_toy",
        f"run_root={root}",
        "--only",
        "seed=0",
        "trainer.max_steps=40",
        "trainer.ckpt_every=4",
        "trainer.log_every=1",
        "+stage.params.delay_s=0.25",
        *SLURM,
    ]
    assert main(args) == 0, capsys.readouterr()
    ((run_dir, job),) = _jobs(root / "smoke_toy").items()
    return job["job_id"], Path(run_dir)


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line]
    return max(steps, default=0)


def _finished_after_requeue(run_dir: Path) -> dict[str, Any] | None:
    status = read_status(run_dir)
    if status and status.get("attempts", 0) >= 2 and status.get("state") == "COMPLETED":
        return status
    return None


def test_scontrol_requeue_resumes_from_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id, run_dir = _start_slow_toy(tmp_path / "runs", capsys)
    _wait_for(lambda: _last_step(run_dir) >= 6, 240, "the job to pass step 6")
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    status = _wait_for(lambda: _finished_after_requeue(run_dir), 300, "the requeued job to finish")
    assert status["step"] == 40
    assert status["resumed_from"] >= 6, "the second attempt must resume, not restart"
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "preempted" for e in events)
    _wait_for(lambda: slurm_states([job_id])[job_id] == "COMPLETED", 60, f"sacct {job_id}")


def test_slurm_warning_signal_checkpoints_and_requeues_through_submitit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # What SLURM sends before the time limit (--signal=USR2@delay), delivered now.
    job_id, run_dir = _start_slow_toy(tmp_path / "runs", capsys)
    _wait_for(lambda: _last_step(run_dir) >= 6, 240, "the job to pass step 6")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=60)
    status = _wait_for(lambda: _finished_after_requeue(run_dir), 300, "the requeued job to finish")
    assert status["step"] == 40 and status["resumed_from"] >= 6
