"""launch.py end to end in this process: dry run, inline toy runs, relaunch, status."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from setok_experiments.cli import main
from setok_experiments.job import read_status
from setok_experiments.record import read_record

REPO = Path(__file__).resolve().parents[1]

# Tiny, fast toy runs: 4 steps, a checkpoint every 2.
TOY = [
    "+exp=smoke_toy",
    "trainer.max_steps=4",
    "trainer.ckpt_every=2",
    "trainer.log_every=1",
    "trainer.micro_batch_size=4",
]


def _run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "smoke_toy").glob("*/config.yaml"))


def test_dry_run_prints_the_plan_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*TOY, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "exp=smoke_toy launcher=inline jobs=2" in out
    assert "seed=0" in out and "seed=1" in out
    assert "trainer.micro_batch_size=4 trainer.seed=1" in out
    assert "runs/smoke_toy/" in out
    assert not (tmp_path / "runs").exists()


def test_bad_override_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*TOY, "trainer.lrr=0.1"]) == 2
    assert "trainer.lrr" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_inline_launch_trains_records_and_relaunch_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    args = [*TOY, f"run_root={root}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    run_dirs = _run_dirs(root)
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        status = read_status(run_dir)
        assert status is not None
        assert status["state"] == "COMPLETED" and status["step"] == 4
        assert status["resumed_from"] == 0 and status["attempts"] == 1
        meta = json.loads((run_dir / "launch_meta.json").read_text())
        assert meta["exp"] == "smoke_toy" and meta["command"][0] == "experiments/launch.py"
        assert meta["uv_lock_sha256"] and len(meta["uv_lock_sha256"]) == 64
        assert meta["git_sha"] is None or len(meta["git_sha"]) == 40
        assert (run_dir / "checkpoints").is_dir()
        assert "max_steps: 4" in (run_dir / "config.yaml").read_text()
    assert out.count("COMPLETED") == 2

    # Same launch again: same run dirs, the trainer resumes at the final step.
    assert main(args) == 0
    capsys.readouterr()
    assert _run_dirs(root) == run_dirs
    for run_dir in run_dirs:
        status = read_status(run_dir)
        assert status is not None
        assert status["attempts"] == 2 and status["resumed_from"] == 4
    record = read_record(root / "smoke_toy")
    assert len(record["launches"]) == 2
    assert {j["run_dir"] for j in record["launches"][1]["jobs"]} == {str(p) for p in run_dirs}

    # status reports every run dir of the experiment.
    assert main(["status", str(root / "smoke_toy"), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["run_dir"] for r in rows) == [str(p) for p in run_dirs]
    assert {r["run_state"] for r in rows} == {"COMPLETED"}
    assert [r["checkpoint_step"] for r in rows] == [4, 4]
    assert {r["attempts"] for r in rows} == {2}
    assert main(["status", str(run_dirs[0])]) == 0
    text = capsys.readouterr().out
    assert "COMPLETED" in text and run_dirs[0].name in text


def test_relaunch_skips_a_run_that_is_still_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    args = [*TOY, f"run_root={root}", "--only", "seed=0"]
    assert main(args) == 0
    capsys.readouterr()
    (run_dir,) = _run_dirs(root)
    # Pretend a job of another launch is training there right now (this process is alive).
    status = read_status(run_dir)
    assert status is not None
    status.update(state="RUNNING", pid=os.getpid(), slurm_job_id=None)
    (run_dir / "job_status.json").write_text(json.dumps(status))

    assert main(args) == 0
    out = capsys.readouterr().out
    assert "still active: not resubmitted" in out and "nothing to launch" in out
    assert read_status(run_dir)["attempts"] == 1  # type: ignore[index]
    record = read_record(root / "smoke_toy")
    assert len(record["launches"]) == 1  # nothing submitted, nothing recorded


def test_failing_job_is_reported_and_exit_code_is_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    # NaN loss on every micro-step: the trainer aborts after max_nonfinite_in_row.
    args = [
        *TOY,
        f"run_root={root}",
        "--only",
        "seed=1",
        "+stage.params.nan_at=[0,1,2,3]",
        "trainer.max_nonfinite_in_row=2",
    ]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "NonFiniteLossError" in out
    (run_dir,) = _run_dirs(root)
    status = read_status(run_dir)
    assert status is not None and status["state"] == "FAILED"
    assert "non-finite" in status["error"]


@pytest.mark.slow
def test_local_launcher_runs_the_array_as_subprocesses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    root = tmp_path / "runs"
    args = [*TOY, f"run_root={root}", "launcher=local", "launcher.poll_s=1", "--wait"]
    assert main([*args, "--only", "seed=1"]) == 0
    out = capsys.readouterr().out
    assert out.count("COMPLETED") == 1
    record = read_record(root / "smoke_toy")
    (launch,) = record["launches"]
    assert launch["launcher"] == "local"
    for job in launch["jobs"]:
        status = read_status(job["run_dir"])
        assert status is not None and status["state"] == "COMPLETED"
        assert status["pid"] != os.getpid()  # ran in a submitit subprocess
        assert int(job["job_id"]) > 0


def test_help_answers_without_importing_the_stack() -> None:
    import subprocess

    script = REPO / "experiments" / "launch.py"
    for argv in (["--help"], ["status", "--help"]):
        out = subprocess.run(
            [sys.executable, str(script), *argv], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert "usage: launch.py" in out.stdout
