"""What the launcher records about jobs stays true: failures keep their traceback, a
relaunch of a finished run keeps its figures, a killed inline job is not shown RUNNING,
launcher-only changes raise no config warning, bad values and paths fail at launch, local
arrays keep to array_parallelism, and every row of the clustering ablation trains."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from setok_experiments.cli import main
from setok_experiments.executors import local_lanes
from setok_experiments.job import read_status
from setok_experiments.record import read_record

TOY = ["+exp=smoke_toy", "trainer.max_steps=4", "trainer.ckpt_every=2", "trainer.log_every=1",
       "trainer.micro_batch_size=4"]  # fmt: skip


def _run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "smoke_toy").glob("*/config.yaml"))


def test_failed_job_keeps_traceback_and_a_one_line_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    args = [*TOY, f"run_root={root}", "--only", "seed=1", "+stage.params.nan_at=[0,1,2,3]",
            "trainer.max_nonfinite_in_row=2"]  # fmt: skip
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "Traceback (most recent call last)" in captured.err
    (run_dir,) = _run_dirs(root)
    status = read_status(run_dir)
    assert status is not None and status["state"] == "FAILED"
    assert "\n" not in status["error"] and status["error"].startswith("NonFiniteLossError")
    log = (run_dir / "error.log").read_text()
    assert "Traceback (most recent call last)" in log and "NonFiniteLossError" in log
    assert main(["status", str(root / "smoke_toy")]) == 0
    out = capsys.readouterr().out
    assert "NonFiniteLossError" in out and "error.log" in out


def test_relaunch_of_a_finished_run_keeps_its_figures_and_launcher_is_no_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    args = [*TOY, f"run_root={root}", "--only", "seed=0"]
    assert main(args) == 0
    (run_dir,) = _run_dirs(root)
    first = read_status(run_dir)
    assert first is not None and math.isfinite(first["last_loss"])
    capsys.readouterr()
    assert main([*args, "launcher.poll_s=3"]) == 0  # only the launcher differs
    captured = capsys.readouterr()
    assert "config changed" not in captured.err
    again = read_status(run_dir)
    assert again is not None and again["attempts"] == 2
    assert again["last_loss"] == first["last_loss"] and again["step"] == first["step"]
    assert again["resumed_from"] == first["step"]  # the relaunch resumed at the end
    assert "nan" not in captured.out


def test_status_says_died_for_a_killed_inline_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    assert main([*TOY, f"run_root={root}", "--only", "seed=0"]) == 0
    (run_dir,) = _run_dirs(root)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    status = read_status(run_dir)
    assert status is not None
    status.update(state="RUNNING", pid=gone.pid, slurm_job_id=None)
    (run_dir / "job_status.json").write_text(json.dumps(status))
    capsys.readouterr()
    assert main(["status", str(root / "smoke_toy"), "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["run_state"].startswith("DIED") and str(gone.pid) in row["run_state"]
    status.update(pid=os.getpid())  # alive: still RUNNING
    (run_dir / "job_status.json").write_text(json.dumps(status))
    assert main(["status", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run_state"] == "RUNNING"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.image_size=-64", "data.image_size"),
        ("trainer.max_steps=4", None),  # control: this one launches
    ],
)
def test_bad_sizes_fail_at_dry_run(
    override: str, named: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["+exp=quickstart", f"run_root={tmp_path}", override, "--dry-run"])
    err = capsys.readouterr().err
    if named is None:
        assert code == 0
    else:
        assert code == 2 and named in err


def test_eval_checkpoint_that_does_not_exist_fails_at_dry_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no_such_export"
    args = ["+exp=eval_shapes", f"run_root={tmp_path}", f"stage.params.checkpoint={missing}"]
    assert main([*args, "--dry-run"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_unwritable_run_root_is_refused_before_compute(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    assert main([*TOY, f"run_root={blocker / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert "run_root" in err and str(blocker) in err
    assert not (tmp_path / "runs").exists()


def test_local_lanes_keep_to_the_parallelism() -> None:
    assert local_lanes(8, 2) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert local_lanes(3, 8) == [[0], [1], [2]]
    assert local_lanes(0 + 1, None) == [[0]]
    assert len(local_lanes(64, None)) == min(64, os.cpu_count() or 1)


@pytest.mark.slow
def test_local_array_runs_one_lane_at_parallelism_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    root = tmp_path / "runs"
    args = [*TOY, f"run_root={root}", "launcher=local", "launcher.poll_s=1",
            "launcher.array_parallelism=1", "--wait"]  # fmt: skip
    assert main(args) == 0
    assert capsys.readouterr().out.count("COMPLETED") == 2
    (launch,) = read_record(root / "smoke_toy")["launches"]
    assert len({job["job_id"] for job in launch["jobs"]}) == 1  # one process, one lane
    spans = sorted(
        (s["started"], s["ended"]) for s in (read_status(d) for d in _run_dirs(root)) if s
    )
    assert len(spans) == 2 and spans[0][1] <= spans[1][0]  # one after the other


@pytest.mark.slow
def test_threshold_row_of_the_clustering_ablation_trains(tmp_path: Path) -> None:
    # A row is the whole SeTokIM pipeline, its eval and row.json (budget=smoke: minutes).
    args = ["+exp=ablation_clustering", f"run_root={tmp_path}", "launcher=inline",
            "--only", "threshold", "budget=smoke"]  # fmt: skip
    assert main(args) == 0
    (status_file,) = (tmp_path / "ablation_clustering").glob("*/job_status.json")
    status = json.loads(status_file.read_text())
    assert status["state"] == "COMPLETED"  # last_loss: none, the job ends with the eval
    row = json.loads((status_file.parent / "row.json").read_text())
    assert row["mechanism"] == "threshold" and row["tokens_min"] >= 1
    assert list(row["steps"]) == ["stage1", "stage2", "stage3"]
    assert (tmp_path / "ablation_clustering" / "report" / "table.md").is_file()
