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


# ---- two nodes: one slurmd per node on the dev cluster (up.sh, SETOK_SLURM_DEV_NODES=2) -------
_RANK_PROBE = """
import json, os, torch, torch.distributed as dist
from setokim.train.distributed import detect_env, init_distributed, shutdown_distributed
env = detect_env()
made = init_distributed(env, torch.device("cpu"))
total = torch.tensor([env.rank + 1.0])
dist.all_reduce(total)  # the ranks of both nodes meet in one gloo group
shutdown_distributed(made)
keys = ("SLURM_NODEID", "SLURMD_NODENAME", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_NODELIST")
print(json.dumps({**{k: os.environ[k] for k in keys}, "rank": env.rank,
                  "world_size": env.world_size, "source": env.source,
                  "master": f"{env.master_addr}:{env.master_port}", "sum": float(total)}))
"""


def _two_nodes() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True,
                         timeout=30, check=True).stdout.split()  # fmt: skip
    if len(set(out)) < 2:
        pytest.fail(f"the dev cluster has nodes {out}; up.sh starts 2 (SETOK_SLURM_DEV_NODES)")
    return sorted(set(out))


def test_two_node_job_through_submitit_runs_a_rank_on_each_node(tmp_path: Path) -> None:
    import sys

    import submitit

    nodes = _two_nodes()
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(slurm_partition="dev", nodes=2, tasks_per_node=1,
                               cpus_per_task=1, mem_gb=1, timeout_min=5)  # fmt: skip
    probe = submitit.helpers.CommandFunction([sys.executable, "-c", _RANK_PROBE], verbose=False)
    job = executor.submit(probe)
    outputs = _wait_for(lambda: job.done() and job.results(), 240, f"job {job.job_id}")
    ranks = sorted((json.loads(out.strip().splitlines()[-1]) for out in outputs),
                   key=lambda r: r["rank"])  # fmt: skip
    assert [r["SLURM_NODEID"] for r in ranks] == ["0", "1"]
    assert sorted(r["SLURMD_NODENAME"] for r in ranks) == nodes[:2]
    assert [r["SLURM_PROCID"] for r in ranks] == ["0", "1"]
    for r in ranks:
        assert r["source"] == "slurm" and r["world_size"] == 2 and r["SLURM_NTASKS"] == "2"
        assert r["sum"] == 3.0  # 1 + 2: both ranks joined the same process group
    assert ranks[0]["master"] == ranks[1]["master"]  # both derive it from the nodelist
    assert ranks[0]["master"].split(":")[0] == ranks[0]["SLURMD_NODENAME"]  # node 0's host


def test_two_node_recipe_trains_one_rank_per_node_through_the_launcher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = _two_nodes()
    root = tmp_path / "runs"
    args = ["+exp=smoke_toy", f"run_root={root}", "--only", "seed=0", "trainer.max_steps=4",
            *SLURM, "cluster.nodes=2", "--wait"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr()
    ((run_dir, job),) = _jobs(root / "smoke_toy").items()
    status = read_status(run_dir)
    assert status is not None and status["state"] == "COMPLETED" and status["step"] == 4
    trainer = json.loads((Path(run_dir) / "trainer.json").read_text())
    assert trainer["env_source"] == "slurm" and trainer["fsdp"] is True
    step = Path(status["checkpoint"]) / "trainer_state.json"
    assert json.loads(step.read_text())["world_size"] == 2
    # the job step ran on both nodes
    query = ["sacct", "-j", job["job_id"], "-n", "-P", "-o", "JobID,NodeList"]
    acct = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout
    steps = dict(line.split("|") for line in acct.splitlines() if line)
    assert steps[f"{job['job_id']}.0"].split(",") == nodes[:2], steps
