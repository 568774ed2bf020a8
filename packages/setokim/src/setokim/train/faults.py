"""Fault injection for training runs: kill a training process at a chosen step, damage
checkpoint files, compare final weights bit for bit.

The reliability tests and `benchmarks/fault_injection.py` share it. A job runs as
`python -m setokim.train.cli` in a fresh process (one thread), so a killed run, its resume
and the uninterrupted reference all start from the same import and thread state. With
`FaultJob.fork` the process is instead forked from the calling interpreter once it has
imported the stage (`ForkedRun`): still a separate process that a real SIGTERM or SIGKILL
ends, but without the ~15 s of imports per run, which is what makes hundreds of kill points
affordable on a CPU box. The caller must be single-threaded (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DAMAGES = ("flip", "truncate", "empty")


@dataclass
class FaultJob:
    """One training job: a registered stage, its params and TrainerConfig fields."""

    stage: str
    params: dict[str, Any]
    settings: dict[str, Any]
    env: dict[str, str] = field(default_factory=lambda: {"OMP_NUM_THREADS": "1"})
    fork: bool = False

    def cli_args(self, run_dir: Path) -> list[str]:
        """The arguments of `python -m setokim.train.cli` that run this job in `run_dir`."""
        sets = [f"{k}={json.dumps(v)}" for k, v in self.settings.items()]
        params = [f"{k}={json.dumps(v)}" for k, v in self.params.items()]
        return [
            self.stage, str(run_dir), "--set", *sets, "progress=false", "log_every=1",
            "--param", *params,
        ]  # fmt: skip

    def command(self, run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "setokim.train.cli", *self.cli_args(run_dir)]

    def spawn(self, run_dir: Path) -> subprocess.Popen[str] | ForkedRun:
        """Start the job (training or resuming in `run_dir`) in a child process."""
        if self.fork:
            return ForkedRun(self.cli_args(run_dir))
        env = {**os.environ, **self.env}
        return subprocess.Popen(
            self.command(run_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def run(self, run_dir: Path, timeout: float = 900) -> tuple[int, dict[str, Any] | None, str]:
        """(return code, the job's summary line or None, the tail of its stderr)."""
        proc = self.spawn(run_dir)
        out, err = proc.communicate(timeout=timeout)
        summary = None
        lines = out.strip().splitlines()
        if proc.returncode == 0 and lines:
            summary = json.loads(lines[-1])
        return proc.returncode, summary, err[-4000:]

    def weights(self, run_dir: Path) -> dict[str, torch.Tensor]:
        """Model weights of the run's latest checkpoint, verified against its manifest."""
        from setokim.stages import build_stage
        from setokim.train.checkpoint import latest_checkpoint, load_model_state

        step_dir = latest_checkpoint(run_dir)
        if step_dir is None:
            raise FileNotFoundError(f"run_dir: {run_dir} has no checkpoint")
        model = build_stage(self.stage, self.params).build_model()
        return {
            k: v.detach().clone() for k, v in load_model_state(step_dir, model).state_dict().items()
        }


class _Output:
    """The child's captured stream, read back as text (the `Popen.stderr` a caller reads)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> str:
        if not self.path.is_file():
            return ""
        return self.path.read_text(encoding="utf-8", errors="replace")


class ForkedRun:
    """`setokim.train.cli.main(args)` in a child forked from this interpreter; the subset of
    `subprocess.Popen` that `kill_at_step` and `FaultJob.run` use (stdout and stderr go to
    temporary files). The child inherits the imports, not the training: it builds the stage,
    loads its checkpoint and trains as a fresh launch would, and ends with `os._exit`."""

    def __init__(self, args: list[str]) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="forked_run_"))
        out_path, err_path = self._dir / "stdout", self._dir / "stderr"
        self.stdout, self.stderr = _Output(out_path), _Output(err_path)
        self.returncode: int | None = None
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's code
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                for fd, path in ((1, out_path), (2, err_path)):
                    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    os.dup2(target, fd)
                    os.close(target)
                from setokim.train.cli import main

                code = main(args)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
                if not isinstance(exc.code, int | None):
                    print(exc.code, file=sys.stderr)
            except BaseException:  # noqa: BLE001 - the child reports every failure
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code or 0)
        self.pid = pid

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"forked run {self.pid}", timeout or 0)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the child; (its stdout, its stderr), and the temporary files removed."""
        self.wait(timeout)
        out, err = self.stdout.read(), self.stderr.read()
        for path in (self.stdout.path, self.stderr.path):
            path.unlink(missing_ok=True)
        self._dir.rmdir()
        return out, err


def tiny_stage1_params(data_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Stage I params small enough for one CPU core: 32 px images, a 16 px diffusion
    decoder with cross-attention at 8x8, a one-layer mask decoder; data generated on use."""
    from setok_decoders.config import tiny_unet_kwargs

    unet = tiny_unet_kwargs(
        sample_size=16,
        block_out_channels=[16, 32],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=32,
    )
    mapper = {"num_queries": 4, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
              "intermediate_size": 64}  # fmt: skip
    return {
        "tokenizer": {"encoder": {"image_size": 32}, "clustering": {"max_clusters": 4}},
        "decoder": {
            "diffusion": {"image_size": 16, "unet": unet, "mapper": mapper, "cond_dropout": 0.0},
            "mask": {"hidden_dim": 32, "num_layers": 1, "num_heads": 2, "mask_scale": 2},
        },
        "data": {"shard_dir": str(data_dir), "image_size": 32},
        "generate_train": 16,
        "generate_image_size": 32,
        "cpu_threads": 1,
        **overrides,
    }


def tiny_mllm_params(data_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Stage II / III params for one CPU core: the tiny random SeTok and LLM, 8 generated
    64 px Shapes World images (every task view; Stage II and III can share them)."""
    return {"data": {"shard_dir": str(data_dir)}, "generate_train": 8, "cpu_threads": 1,
            **overrides}  # fmt: skip


TINY_LORA = {"rank": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}


def tiny_jobs(
    data_root: Path,
    settings: dict[str, Any],
    *,
    stage3_init: Path | None = None,
    fork: bool = False,
) -> dict[str, FaultJob]:
    """One small job per objective and phase layout, data under `data_root`:
    `stage1` is a combined run (4 sub-phase-1 micro-batches, then sub-phase 2); `stage3`
    trains LoRA over `stage3_init` (a Stage II export) or, None, over a seeded random model."""
    s3 = tiny_mllm_params(data_root / "s23", lora=TINY_LORA)
    if stage3_init is not None:
        s3["init_from"] = str(stage3_init)
    jobs = {
        "quickstart": FaultJob(
            "quickstart",
            {"data": {"shard_dir": str(data_root / "qs")}, "generate_train": 16},
            {**settings, "micro_batch_size": 4},
        ),
        "stage1": FaultJob(
            "stage1",
            tiny_stage1_params(data_root / "s1", subphase=2, subphase1_batches=4),
            {**settings, "micro_batch_size": 2},
        ),
        "stage2": FaultJob(
            "stage2", tiny_mllm_params(data_root / "s23"), {**settings, "micro_batch_size": 2}
        ),
        "stage3": FaultJob("stage3", s3, {**settings, "micro_batch_size": 2}),
    }
    for job in jobs.values():
        job.fork = fork
    return jobs


def logged_step(run_dir: Path) -> int:
    """The last step in the run's metrics.jsonl (-1 before the first), ignoring a torn line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return -1
    step = -1
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            step = max(step, int(record["step"]))
    return step


def kill_at_step(
    job: FaultJob,
    run_dir: Path,
    step: int,
    sig: int,
    *,
    delay_s: float = 0.0,
    timeout: float = 900,
) -> int:
    """Start the job, send `sig` once it has logged `step` (plus `delay_s`); its return code.

    A job that ends before reaching `step` is an error (pick a step below max_steps).
    """
    proc = job.spawn(run_dir)
    deadline = time.monotonic() + timeout
    try:
        while logged_step(run_dir) < step:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"job ended (rc {proc.returncode}) before step {step}: "
                    f"{proc.stderr.read()[-3000:] if proc.stderr else ''}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"job did not reach step {step} in {timeout} s")
            time.sleep(0.01)
        if delay_s:
            time.sleep(delay_s)
        if proc.poll() is None:
            proc.send_signal(sig)
        proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


def damage(path: Path, mode: str, rng: random.Random, flips: int = 400) -> None:
    """Corrupt one file in place: flip `flips` random bytes, cut it in half, or empty it."""
    data = bytearray(Path(path).read_bytes())
    if mode == "flip":
        for _ in range(min(flips, len(data))):
            i = rng.randrange(len(data))
            data[i] ^= 0xFF
    elif mode == "truncate":
        data = data[: len(data) // 2]
    elif mode == "empty":
        data = bytearray()
    else:
        raise ValueError(f"mode: expected one of {DAMAGES}, got {mode!r}")
    Path(path).write_bytes(bytes(data))


def differing(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors are not bit-identical (or missing on one side)."""
    keys = sorted(set(got) | set(want))
    return [k for k in keys if k not in got or k not in want or not torch.equal(got[k], want[k])]


__all__ = [
    "DAMAGES",
    "TINY_LORA",
    "FaultJob",
    "ForkedRun",
    "damage",
    "differing",
    "kill_at_step",
    "logged_step",
    "tiny_jobs",
    "tiny_mllm_params",
    "tiny_stage1_params",
]
