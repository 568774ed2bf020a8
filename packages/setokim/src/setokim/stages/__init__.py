"""Two registries under one namespace of names in `stage.name`:

- objectives: what the one training loop optimises (`Objective`, the `train.Stage`
  protocol): toy, quickstart, stage1, stage2, stage3; a launcher trains them with
  `setokim.train.train`;
- jobs: what a launcher runs in a run dir by itself (`Job`: `run(run_dir, wandb)`):
  pipeline (objectives in sequence, each exported), eval, study.

Factories are imported lazily so that choosing "toy" never imports the tokenizer stack.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from setokim.train.stage import Stage

Objective = Stage  # hooks: build_model, fsdp_units, batches, loss; optional (getattr):
# trainable, describe, epoch_batches, frozen_sources, build_model_deferred,
# export(checkpoint, out_dir) -> Path


@dataclass
class JobResult:
    """What a launcher records of a job's run: how far it got and whether to requeue it.

    `train.TrainResult` has these fields too; `last_loss` is None for a job without a loss.
    """

    step: int
    resumed_from: int = 0
    preempted: bool = False
    signal: int | None = None  # the signal that caused the preemption, if any
    checkpoint: Path | None = None
    last_loss: float | None = None
    skipped_steps: int = 0


@runtime_checkable
class Job(Protocol):
    """A job a launcher runs in its run dir; it resumes from what the run dir holds."""

    def run(self, run_dir: str | os.PathLike[str], wandb: Any = None) -> JobResult:
        """Run (or resume) in `run_dir`; a SIGTERM/SIGUSR1 ends it with `preempted`."""
        ...


Factory = Callable[[Mapping[str, Any]], Any]

# name -> "module:function" (lazy) or a callable registered at run time.
_OBJECTIVES: dict[str, str | Factory] = {
    "toy": "setokim.stages.toy:build",
    "quickstart": "setokim.stages.quickstart:build",
    "stage1": "setokim.stages.stage1:build",
    "stage2": "setokim.stages.stage2:build",
    "stage3": "setokim.stages.stage3:build",
}
_JOBS: dict[str, str | Factory] = {
    "pipeline": "setokim.stages.pipeline:build",
    "eval": "setokim.stages.evaluate:build",
    "study": "setokim.stages.study:build",  # a paper-analysis row: pipeline + eval + row.json
}


def register_stage(name: str, factory: str | Factory, *, job: bool = False) -> None:
    """Add an objective (or, with `job`, a job); a name may not be registered twice."""
    if name in _OBJECTIVES or name in _JOBS:
        raise ValueError(f"stage name {name!r} is already registered")
    (_JOBS if job else _OBJECTIVES)[name] = factory


def available_stages() -> list[str]:
    """Sorted registered names, objectives and jobs."""
    return sorted({**_OBJECTIVES, **_JOBS})


def is_job(name: str) -> bool:
    """Whether `name` is a job (run by itself) rather than an objective (trained)."""
    return name in _JOBS


def build_stage(name: str, cfg: Mapping[str, Any] | None = None) -> Objective | Job:
    """Build objective or job `name` from its config mapping (unknown keys raise inside)."""
    factory = _OBJECTIVES.get(name) or _JOBS.get(name)
    if factory is None:
        raise ValueError(f"name: unknown stage {name!r}; available: {available_stages()}")
    if isinstance(factory, str):
        module_name, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
    return factory(dict(cfg or {}))
