"""Exact resume across processes: a training subprocess is SIGKILLed (or SIGTERMed) mid-run,
then resumed; the final weights equal an uninterrupted run's bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from setokim.stages import build_stage
from setokim.train import latest_checkpoint, load_model_state

pytestmark = pytest.mark.slow

TOY = {"hidden": 32, "depth": 2, "dropout": 0.1}
SETTINGS = {"max_steps": 30, "micro_batch_size": 8, "grad_accum": 2, "lr": 3e-3,
            "warmup_steps": 3, "ckpt_every": 3, "keep_last": 2, "log_every": 1}  # fmt: skip


def _spawn(run_dir: Path) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "setokim.train.cli", "toy", str(run_dir),
        "--set", *[f"{k}={v}" for k, v in SETTINGS.items()], "progress=false",
        "--param", *[f"{k}={v}" for k, v in TOY.items()], "delay_s=0.05",
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _latest_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return -1
    return int(pointer.read_text().strip().split("_")[1])


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + 240
    while _latest_step(run_dir) < step:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    model = build_stage("toy", TOY).build_model()
    return load_model_state(latest_checkpoint(run_dir), model).state_dict()


def _run_to_end(run_dir: Path) -> dict:
    """Train (or resume) in a fresh process, as the killed run did: the same thread
    settings and import state, so bit-identity is not at the mercy of whatever earlier
    tests in this pytest process changed (torch.set_num_threads, say)."""
    proc = _spawn(run_dir)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("straight")
    _run_to_end(run_dir)
    return _weights(run_dir)


def _assert_bit_identical(got: dict, want: dict, note: str) -> None:
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key} differs ({note})"


def test_sigkill_at_random_step_then_resume(tmp_path: Path, reference: dict) -> None:
    kill_after = random.choice(range(3, 25, 3))  # a checkpoint step; the kill lands later
    proc = _spawn(tmp_path)
    try:
        _wait_for_checkpoint(proc, tmp_path, kill_after)
        time.sleep(random.uniform(0.0, 0.2))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = _latest_step(tmp_path)
    assert kill_after <= saved < SETTINGS["max_steps"]
    resumed = _run_to_end(tmp_path)
    assert resumed["resumed_from"] == saved and resumed["step"] == SETTINGS["max_steps"]
    _assert_bit_identical(_weights(tmp_path), reference, f"killed after step {saved}")


def test_sigterm_saves_exits_cleanly_then_resume(tmp_path: Path, reference: dict) -> None:
    proc = _spawn(tmp_path)
    _wait_for_checkpoint(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["preempted"] and summary["signal"] == signal.SIGTERM
    assert summary["step"] == _latest_step(tmp_path) >= 3
    resumed = _run_to_end(tmp_path)
    assert resumed["resumed_from"] == summary["step"]
    _assert_bit_identical(_weights(tmp_path), reference, f"stopped at step {summary['step']}")
