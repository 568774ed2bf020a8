"""The one training loop: a Stage supplies model, batches and loss; this does the rest."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from setokim.train.checkpoint import (
    TrainerState,
    frozen_record,
    init_optimizer_state,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    resume_checkpoint,
    resume_data_position,
    save_checkpoint,
)
from setokim.train.config import TrainerConfig, WandbConfig, resolve_schedule
from setokim.train.distributed import (
    DistEnv,
    detect_env,
    init_distributed,
    select_device,
    shutdown_distributed,
)
from setokim.train.metrics import MetricsLogger
from setokim.train.optim import build_optimizer
from setokim.train.parallel import (
    allreduce_gradients,
    apply_activation_checkpointing,
    apply_fsdp,
    broadcast_parameters,
    meta_tensors,
)
from setokim.train.result import TrainResult
from setokim.train.rng import seed_all
from setokim.train.schedule import build_scheduler
from setokim.train.signals import PreemptionFlag
from setokim.train.stage import Stage
from setokim.utils.io import atomic_write_json

StepHook = Callable[[int, float], None]


class NonFiniteLossError(FloatingPointError):
    """Raised after `max_nonfinite_in_row` consecutive steps with a non-finite loss/grad."""


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors, also nested in mappings, sequences and dataclasses, to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return type(obj)({k: to_device(v, device) for k, v in obj.items()})  # type: ignore[call-arg]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        moved = {
            f.name: to_device(getattr(obj, f.name), device)
            for f in dataclasses.fields(obj)
            if f.init
        }
        return dataclasses.replace(obj, **moved)
    return obj


def _env_from_group() -> DistEnv:
    """Describe a process group someone else (a test, a launcher) already created."""
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        master_addr="",
        master_port=0,
        source="external",
    )


def _resolve_precision(cfg: TrainerConfig, device: torch.device) -> torch.dtype | None:
    """None means fp32; otherwise the low-precision compute dtype."""
    if cfg.mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if cfg.mixed_precision == "bf16" else None


def _grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()  # sharded grads: sum of squares over ranks
    return norm


def _any_rank(local: bool, world: int, device: torch.device) -> bool:
    """True on every rank if it is true on some rank (signals reach ranks at different times)."""
    if world == 1:
        return local
    flag = torch.tensor([float(local)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def resolve_stage_schedule(
    stage: Stage, cfg: TrainerConfig, rank: int, world_size: int
) -> tuple[TrainerConfig, dict[str, Any] | None]:
    """`resolve_schedule` with the stage's epoch length; (cfg, what was derived or None).

    The micro-batches per rank and epoch come from the stage's optional
    `epoch_batches(rank, world_size, micro_batch_size)`, asked for only when `cfg.epochs`
    is set (it may have to generate the data first). The record gives them in samples too.
    """
    if cfg.epochs is None and cfg.warmup_ratio is None:
        return cfg, None
    counter = getattr(stage, "epoch_batches", None)
    batches = None
    if cfg.epochs is not None and callable(counter):
        batches = counter(rank, world_size, cfg.micro_batch_size)
    out = resolve_schedule(cfg, batches, world_size)
    info = {
        "epochs": cfg.epochs,
        "epoch_batches": batches,
        "epoch_samples": None if batches is None else batches * cfg.micro_batch_size * world_size,
        "global_batch": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "warmup_ratio": cfg.warmup_ratio,
        "max_steps": out.max_steps,
        "warmup_steps": out.warmup_steps,
    }
    return out, info


def train(
    stage: Stage,
    cfg: TrainerConfig,
    run_dir: str | os.PathLike[str],
    wandb: WandbConfig | None = None,
    *,
    on_step: StepHook | None = None,
) -> TrainResult:
    """Train `stage` under `cfg`, checkpointing into `run_dir` and resuming from it.

    Distributed layout comes from the environment (torchrun, SLURM, or a single process);
    an existing process group is used as is. `on_step(step, loss)` runs on every rank after
    each optimizer step (tests use it to deliver signals at a chosen step).
    Returns with `preempted=True` after saving when SIGTERM/SIGUSR1 arrived.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        env, created = _env_from_group(), False
        device = select_device(env)
    else:
        env = detect_env()
        device = select_device(env)
        created = init_distributed(env, device)
    use_fsdp = cfg.fsdp == "on" or (cfg.fsdp == "auto" and env.world_size > 1)
    single_group_file = None
    if use_fsdp and not dist.is_initialized():
        # FSDP needs a process group even on one rank: a private file-store group.
        fd, single_group_file = tempfile.mkstemp(prefix="setok_pg_")
        os.close(fd)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"file://{single_group_file}",
            rank=0,
            world_size=1,
        )
        created = True
    try:
        return Trainer(stage, cfg, run_dir, wandb, env, device, use_fsdp).fit(on_step)
    finally:
        shutdown_distributed(created)
        if single_group_file is not None:
            Path(single_group_file).unlink(missing_ok=True)


@dataclasses.dataclass
class StepOutput:
    """One optimizer step as the log sees it."""

    loss: float
    grad_norm: float
    lr: float
    finite: bool
    metrics: dict[str, float]  # summed over the micro-batches


class Trainer:
    """One call of `train()` in torchtitan's shape: setup (`__init__`), `train_step`, `log`,
    `save`, and `fit` looping over them. The order of RNG draws is the resume contract."""

    def __init__(
        self,
        stage: Stage,
        cfg: TrainerConfig,
        run_dir: Path,
        wandb_cfg: WandbConfig | None,
        env: DistEnv,
        device: torch.device,
        use_fsdp: bool,
    ) -> None:
        self.stage, self.run_dir, self.env, self.device = stage, run_dir, env, device
        self.use_fsdp, self.world = use_fsdp, env.world_size
        self.low_dtype = _resolve_precision(cfg, device)
        self.cfg, self.schedule = resolve_stage_schedule(stage, cfg, env.rank, self.world)
        cfg = self.cfg
        if self.schedule is not None and env.is_main:
            print(
                "schedule: " + ", ".join(f"{k}={v}" for k, v in self.schedule.items()), flush=True
            )
        self.model = self._build_model()
        self.params = self._trainable_params()
        self.optimizer = build_optimizer(self.model, self.params, cfg)
        init_optimizer_state(self.optimizer)  # every parameter's state exists in every checkpoint
        self.scheduler = build_scheduler(
            self.optimizer,
            warmup_steps=cfg.warmup_steps,
            max_steps=cfg.max_steps,
            min_lr_ratio=cfg.min_lr_ratio,
        )
        # Frozen modules rebuilt from files (Stage II/III's SeTok, Stage III's base): not stored
        # in checkpoints; their path and SHA-256 are, and resume refuses other bytes.
        sources = getattr(stage, "frozen_sources", None)
        self.frozen = frozen_record(sources()) if callable(sources) else None
        self.step = self.data_position = self.skipped = self.in_row = 0
        self.resumed_from, self.last_saved, rejected = self._resume()
        meta = self._metadata(rejected)
        if env.is_main:
            atomic_write_json(run_dir / "trainer.json", meta)
        self.logger = MetricsLogger(run_dir, active=env.is_main, wandb_cfg=wandb_cfg, config=meta)
        self.batches: Iterator[Any] = iter(
            stage.batches(env.rank, self.world, self.data_position, cfg.micro_batch_size)
        )

    def _build_model(self) -> nn.Module:
        """Same seed everywhere: identical initial weights on every rank without a broadcast."""
        cfg, world = self.cfg, self.world
        seed_all(cfg.seed)
        # Sharded over ranks, a stage may leave its large frozen weights on the meta device
        # and fill each rank's rows after fully_shard (a whole copy per rank otherwise).
        build_deferred = getattr(self.stage, "build_model_deferred", None)
        deferred = build_deferred() if self.use_fsdp and world > 1 and build_deferred else None
        model = self.stage.build_model() if deferred is None else deferred.model
        units = list(self.stage.fsdp_units(model))
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(units)
        if deferred is None:  # fully_shard moves what is not on the meta device
            model.to(self.device)
        dtype, device_type = self.low_dtype, self.device.type
        self.autocast: Callable[[], Any] = contextlib.nullcontext
        if self.use_fsdp:
            apply_fsdp(model, units, device_type=device_type, world_size=world, param_dtype=dtype)
            if deferred is not None:
                deferred.materialise(self.device)
                left = meta_tensors(model)
                if left:
                    raise RuntimeError(
                        f"stage: still on the meta device after materialise: {left[:5]}"
                    )
        else:
            if world > 1:
                broadcast_parameters(model)
            if dtype is not None:
                self.autocast = lambda: torch.autocast(device_type, dtype=dtype)
        model.train()
        return model

    def _trainable_params(self) -> list[nn.Parameter]:
        trainable = getattr(self.stage, "trainable", None)
        params = list(trainable(self.model)) if trainable else list(self.model.parameters())
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("stage: the model has no trainable parameters")
        return params

    def _resume(self) -> tuple[int, int, list[Any]]:
        """Load the newest verified checkpoint if any: (resumed_from, last_saved, rejected)."""
        cfg = self.cfg
        ckpt_path, rejected = resume_checkpoint(self.run_dir) if cfg.resume else (None, [])
        if ckpt_path is None:
            seed_all(cfg.seed + 1_000_003 * self.env.rank)  # per-rank stream for dropout etc.
            return 0, -1, rejected
        self.data_position = resume_data_position(
            read_trainer_state(ckpt_path), ckpt_path, world_size=self.world,
            micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum,
            policy=cfg.world_size_change,
        )  # fmt: skip
        state = load_checkpoint(
            ckpt_path, self.model, self.optimizer, seed=cfg.seed, frozen=self.frozen
        )
        self.scheduler.load_state_dict(state.scheduler)
        self.step, self.skipped, self.in_row = (
            state.step,
            state.skipped_steps,
            state.nonfinite_in_row,
        )
        return self.step, self.step, rejected

    def _metadata(self, rejected: list[Any]) -> dict[str, Any]:
        describe = getattr(self.stage, "describe", None)
        return {
            "trainer": dataclasses.asdict(self.cfg),
            "stage": describe() if describe else type(self.stage).__name__,
            "world_size": self.world,
            "env_source": self.env.source,
            "device": str(self.device),
            "fsdp": self.use_fsdp,
            "precision": str(self.low_dtype or torch.float32),
            "resumed_from": self.resumed_from,
            "rejected_checkpoints": rejected,
            "schedule": self.schedule,
        }

    def _next_batch(self) -> Any:
        try:
            batch = next(self.batches)
        except StopIteration:
            raise RuntimeError(
                f"stage: batches() ran out at data position {self.data_position} "
                f"(step {self.step}); stages must yield indefinitely"
            ) from None
        return to_device(batch, self.device)

    def _forward_backward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """One micro-batch's loss (detached, fp64) after its backward pass."""
        with self.autocast():
            loss, metrics = self.stage.loss(self.model, batch)
        if loss.ndim != 0:
            raise ValueError(f"stage: loss must be a scalar, got shape {tuple(loss.shape)}")
        (loss / self.cfg.grad_accum).backward()
        return loss.detach().double(), metrics

    def train_step(self) -> StepOutput:
        """grad_accum micro-batches, then one optimizer step (skipped when non-finite)."""
        cfg, world, params = self.cfg, self.world, self.params
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        metric_sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            if self.use_fsdp:
                self.model.set_requires_gradient_sync(micro == cfg.grad_accum - 1)  # type: ignore[operator]
            loss, metrics = self._forward_backward(self._next_batch())
            loss_sum += loss
            for key, value in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + float(value)
            self.data_position += 1
        if not self.use_fsdp and world > 1:
            allreduce_gradients(params, world)
        if world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        step_loss = float(loss_sum) / (cfg.grad_accum * world)

        grad_norm = _grad_norm(params)
        finite = math.isfinite(step_loss) and bool(torch.isfinite(grad_norm))
        if finite:
            if cfg.clip_grad > 0:
                torch.nn.utils.clip_grads_with_norm_(params, cfg.clip_grad, grad_norm)
            self.optimizer.step()
            self.in_row = 0
        else:
            self.skipped += 1
            self.in_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step += 1
        return StepOutput(step_loss, float(grad_norm), lr, finite, metric_sums)

    def log(self, out: StepOutput, samples_per_s: float) -> None:
        """Every skipped step (aborting after too many in a row); metrics every log_every."""
        cfg, step = self.cfg, self.step
        if not out.finite:
            self.logger.log(
                {
                    "step": step,
                    "event": "nonfinite_skip",
                    "loss": out.loss,
                    "skipped_steps": self.skipped,
                    "in_row": self.in_row,
                }
            )
            if self.in_row >= cfg.max_nonfinite_in_row:
                raise NonFiniteLossError(
                    f"non-finite loss or gradient in {self.in_row} consecutive steps "
                    f"(last at step {step}, loss={out.loss}); aborting — lower the lr, "
                    f"enable clip_grad, or raise TrainerConfig.max_nonfinite_in_row"
                )
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            record = {
                "step": step,
                "loss": out.loss,
                "lr": out.lr,
                "grad_norm": out.grad_norm,
                "samples_per_s": samples_per_s,
                "skipped_steps": self.skipped,
            }
            record.update({k: v / cfg.grad_accum for k, v in out.metrics.items()})
            self.logger.log(record)

    def save(self) -> Path:
        """Checkpoint the current step (model, optimizer, scheduler, data position, RNG)."""
        cfg = self.cfg
        state = TrainerState(
            step=self.step,
            data_position=self.data_position,
            skipped_steps=self.skipped,
            nonfinite_in_row=self.in_row,
            world_size=self.world,
            scheduler=self.scheduler.state_dict(),
            micro_batch_size=cfg.micro_batch_size,
            grad_accum=cfg.grad_accum,
        )
        path = save_checkpoint(
            self.run_dir, self.model, self.optimizer, state, cfg.keep_last, self.frozen
        )
        self.last_saved = self.step
        return path

    def fit(self, on_step: StepHook | None) -> TrainResult:
        """Step until max_steps or a preemption signal; save on the way and at the end."""
        cfg = self.cfg
        samples_per_step = cfg.micro_batch_size * cfg.grad_accum * self.world
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not (self.env.is_main and cfg.progress),
            desc="train",
            dynamic_ncols=True,
        )
        history: list[float] = []
        preempted = False
        loop_start = time.perf_counter()
        try:
            with PreemptionFlag() as flag:
                while self.step < cfg.max_steps:
                    out = self.train_step()
                    history.append(out.loss)
                    rate = (
                        len(history)
                        * samples_per_step
                        / max(time.perf_counter() - loop_start, 1e-9)
                    )
                    self.log(out, rate)
                    bar.update(1)
                    bar.set_postfix(loss=f"{out.loss:.4f}", sps=f"{rate:.1f}", refresh=False)
                    if on_step is not None:
                        on_step(self.step, out.loss)
                    if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                        self.save()
                    if _any_rank(flag.requested, self.world, self.device):
                        preempted = True
                        break
                loop_seconds = time.perf_counter() - loop_start
                if (preempted or cfg.save_final) and self.last_saved != self.step:
                    self.save()
                final_path = (
                    latest_checkpoint(self.run_dir) if self.last_saved == self.step else None
                )
                if preempted:
                    self.logger.log(
                        {"step": self.step, "event": "preempted", "signal": flag.received}
                    )
        finally:
            bar.close()
            self.logger.close()

        return TrainResult(
            step=self.step,
            last_loss=history[-1] if history else float("nan"),
            skipped_steps=self.skipped,
            checkpoint=final_path,
            preempted=preempted,
            resumed_from=self.resumed_from,
            loop_seconds=loop_seconds,
            samples_per_s=len(history) * samples_per_step / max(loop_seconds, 1e-9),
            world_size=self.world,
            signal=flag.received if preempted else None,
            history=history,
        )
