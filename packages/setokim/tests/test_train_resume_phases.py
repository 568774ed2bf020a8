"""Every objective, killed in every phase (SIGTERM and SIGKILL), resumes to the weights of
an uninterrupted run bit for bit: quickstart, Stage I sub-phase 1 and sub-phase 2 of a
combined run (whose sub-phase-1 checkpoints once lacked the encoder's optimizer state),
Stage II, and Stage III's LoRA (with adapter dropout, so the restored RNG state matters).
`benchmarks/fault_injection.py` runs the same jobs at many random kill points."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from setokim.train.faults import differing, kill_at_step, tiny_jobs

pytestmark = pytest.mark.slow

MAX_STEPS = 6
SETTINGS = {"max_steps": MAX_STEPS, "lr": 1e-3, "warmup_steps": 2, "ckpt_every": 1,
            "keep_last": 2}  # fmt: skip


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Per objective: (job, weights of an uninterrupted run)."""
    root = tmp_path_factory.mktemp("phases")
    out = {}
    for name, job in tiny_jobs(root / "data", SETTINGS).items():
        rc, _, err = job.run(root / name)
        assert rc == 0, err
        out[name] = (job, job.weights(root / name))
    return out


@pytest.mark.parametrize(
    ("objective", "kill_step", "sig"),
    [
        ("stage1", 2, signal.SIGTERM),  # sub-phase 1
        ("stage1", 2, signal.SIGKILL),  # sub-phase 1: resumes from a sub-phase-1 checkpoint
        ("stage1", 4, signal.SIGKILL),  # sub-phase 2
        ("quickstart", 3, signal.SIGKILL),
        ("stage2", 2, signal.SIGTERM),
        ("stage2", 3, signal.SIGKILL),
        ("stage3", 2, signal.SIGTERM),
        ("stage3", 4, signal.SIGKILL),
    ],
)
def test_killed_run_resumes_bit_identical(
    objective: str, kill_step: int, sig: int, references: dict[str, Any], tmp_path: Path
) -> None:
    job, want = references[objective]
    rc = kill_at_step(job, tmp_path, kill_step, sig)
    assert rc == (0 if sig == signal.SIGTERM else -sig)
    rc, summary, err = job.run(tmp_path)
    assert rc == 0, err
    assert summary is not None and 0 < summary["resumed_from"] < MAX_STEPS
    assert summary["step"] == MAX_STEPS
    assert differing(job.weights(tmp_path), want) == []
