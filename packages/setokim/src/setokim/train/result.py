"""What `train()` hands back to its caller (the launcher decides whether to requeue)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainResult:
    """Outcome of one call to `train()`.

    preempted: a SIGTERM/SIGUSR1 arrived; a checkpoint was written at `step` and the caller
    should exit cleanly so that SLURM/submitit can requeue the job (which then resumes).
    loop_seconds: wall time spent in the step loop only (no setup, no final save).
    """

    step: int
    last_loss: float
    skipped_steps: int
    checkpoint: Path | None
    preempted: bool
    resumed_from: int
    loop_seconds: float
    samples_per_s: float
    world_size: int
    signal: int | None = None  # the signal that caused the preemption, if any
    history: list[float] = field(default_factory=list)  # loss per optimizer step (this call)
