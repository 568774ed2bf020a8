"""The function every launcher runs: build the stage, train it in its run dir, report.

`TrainJob` is a submitit `Checkpointable`. Preemption paths:
- SLURM's warning signal (submitit's, USR2 by default, `--signal=USR2@delay`) is forwarded
  to the trainer as SIGUSR1, so it checkpoints at the next step boundary; then submitit's own
  handler runs `checkpoint()` (the same call again) and `scontrol requeue`s the job.
- SIGTERM (`scontrol requeue`, scancel, preemption by SLURM) makes the trainer checkpoint and
  return; the job then exits without a result, and SLURM decides (requeue or cancel).
A requeued or relaunched job finds the checkpoint in its run dir and resumes.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import submitit

from setokim.utils.io import atomic_write_json

STATUS_FILE = "job_status.json"
ERROR_LOG = "error.log"  # full tracebacks of failed attempts, appended
CONFIG_FILE = "config.yaml"
EXIT_PREEMPTED = 0  # SLURM requeues or cancels on its own; the exit code is not the signal


@dataclass(frozen=True)
class JobSpec:
    """Everything a job needs, pickled by submitit (plain data only)."""

    exp: str
    index: int
    name: str
    run_dir: str
    config_yaml: str
    overrides: list[str] = field(default_factory=list)


def read_status(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run dir's last job status (None before any job started there)."""
    import json

    path = Path(run_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def _global_rank() -> int:
    for key in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def _write_status(run_dir: Path, **fields: Any) -> None:
    previous = read_status(run_dir) or {}
    atomic_write_json(run_dir / STATUS_FILE, {**previous, **fields, "updated": time.time()})


def _submitit_preempt_signal() -> signal.Signals | None:
    """submitit's requeue signal when running under its SLURM/local environment."""
    if os.environ.get("SUBMITIT_EXECUTOR") not in ("slurm", "local"):
        return None
    sig = signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]
    return None if sig in (signal.SIGTERM, signal.SIGUSR1) else sig


class _ForwardToTrainer:
    """While training, turn submitit's warning signal into the trainer's SIGUSR1."""

    def __init__(self, sig: signal.Signals | None) -> None:
        self.sig = sig
        self.fired = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        self.fired = True
        os.kill(os.getpid(), signal.SIGUSR1)

    def __enter__(self) -> _ForwardToTrainer:
        if self.sig is not None:
            self._previous = signal.signal(self.sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.sig is not None:
            signal.signal(self.sig, self._previous)


class TrainJob(submitit.helpers.Checkpointable):
    """Train one planned run; returns a summary dict (state, step, loss, checkpoint)."""

    def __call__(self, spec: JobSpec) -> dict[str, Any]:
        from omegaconf import OmegaConf

        from setok_experiments.compose import from_yaml
        from setokim.stages import build_stage, is_job
        from setokim.train import train

        run_dir = Path(spec.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        main = _global_rank() == 0
        if main:
            attempts = int((read_status(run_dir) or {}).get("attempts", 0)) + 1
            _write_status(
                run_dir,
                state="RUNNING",
                pid=os.getpid(),
                host=socket.gethostname(),
                slurm_job_id=_slurm_job_id(),
                attempts=attempts,
                started=time.time(),
                error=None,
            )
        try:
            cfg = from_yaml(spec.config_yaml)
            params = OmegaConf.to_container(
                OmegaConf.create(spec.config_yaml).stage.params, resolve=True
            )
            stage = build_stage(cfg.stage.name, params)  # type: ignore[arg-type]
            forward = _ForwardToTrainer(_submitit_preempt_signal())
            with forward:
                # A job (pipeline, eval, study) runs by itself; an objective is trained.
                if is_job(cfg.stage.name):
                    result = stage.run(run_dir, wandb=cfg.wandb)  # type: ignore[union-attr]
                else:
                    result = train(stage, cfg.trainer, run_dir, wandb=cfg.wandb)  # type: ignore[arg-type]
        except BaseException as err:
            if main:
                state = "INTERRUPTED" if isinstance(err, KeyboardInterrupt) else "FAILED"
                log = _log_traceback(run_dir, err)
                _write_status(
                    run_dir, state=state, ended=time.time(), error=short_error(err), error_log=log
                )
            raise

        previous = read_status(run_dir) or {}
        ran = result.step != result.resumed_from or result.resumed_from == 0
        if not ran and previous.get("step") == result.step:
            # Relaunch of a finished run: nothing trained, the recorded figures stand.
            last_loss = previous.get("last_loss", result.last_loss)
        else:
            last_loss = result.last_loss
        summary = {
            "state": "PREEMPTED" if result.preempted else "COMPLETED",
            "run_dir": str(run_dir),
            "step": result.step,
            "last_loss": last_loss,
            "resumed_from": result.resumed_from,
            "skipped_steps": result.skipped_steps,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        }
        if main:
            _write_status(
                run_dir,
                state=summary["state"],
                ended=time.time(),
                step=result.step,
                last_loss=last_loss,
                resumed_from=result.resumed_from,
                checkpoint=summary["checkpoint"],
            )
        if result.preempted:
            warned = forward.fired or getattr(result, "signal", None) == signal.SIGUSR1
            if warned and forward.sig is not None:
                # submitit's handler: checkpoint() -> DelayedSubmission(self, spec), then
                # `scontrol requeue` and exit. Rank 0 requeues; other ranks just return.
                signal.raise_signal(forward.sig)
            if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and main:
                # SIGTERM: SLURM is requeueing or cancelling this job; leave no result.
                sys.exit(EXIT_PREEMPTED)
        return summary


class LaneJob:
    """A local array's lane: its share of the specs, one after another, so that no more than
    `launcher.array_parallelism` jobs run at once. A failed spec does not stop the lane: its
    summary is {"state": "FAILED", "error": ...} (the traceback is in its run dir)."""

    def __call__(self, specs: list[JobSpec]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for spec in specs:
            try:
                out.append(TrainJob()(spec))
            except Exception as err:  # noqa: BLE001 — reported per spec
                out.append({"state": "FAILED", "error": short_error(err), "run_dir": spec.run_dir})
        return out


def _slurm_job_id() -> str | None:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


def short_error(err: BaseException) -> str:
    """One line: the exception type and the first line of its message (status shows it)."""
    message = str(err).strip().splitlines()
    first = f"{type(err).__name__}: {message[0]}" if message else type(err).__name__
    return first if len(first) <= 300 else first[:297] + "..."


def _log_traceback(run_dir: Path, err: BaseException) -> str:
    """Print the full traceback to stderr (the job's log) and append it to run_dir/error.log."""
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    print(text, file=sys.stderr, flush=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    path = run_dir / ERROR_LOG
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"--- {stamp} pid {os.getpid()} on {socket.gethostname()}\n{text}\n")
    return str(path)
