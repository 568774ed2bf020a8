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
        return _train(stage, cfg, run_dir, wandb, env, device, use_fsdp, on_step)
    finally:
        shutdown_distributed(created)
        if single_group_file is not None:
            Path(single_group_file).unlink(missing_ok=True)


def _train(
    stage: Stage,
    cfg: TrainerConfig,
    run_dir: Path,
    wandb_cfg: WandbConfig | None,
    env: DistEnv,
    device: torch.device,
    use_fsdp: bool,
    on_step: StepHook | None,
) -> TrainResult:
    world = env.world_size
    low_dtype = _resolve_precision(cfg, device)
    cfg, schedule = resolve_stage_schedule(stage, cfg, env.rank, world)
    if schedule is not None and env.is_main:
        print("schedule: " + ", ".join(f"{k}={v}" for k, v in schedule.items()), flush=True)

    # Same seed everywhere: identical initial weights on every rank without a broadcast.
    seed_all(cfg.seed)
    model = stage.build_model()
    units = list(stage.fsdp_units(model))
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(units)
    model.to(device)
    if use_fsdp:
        apply_fsdp(model, units, device_type=device.type, world_size=world, param_dtype=low_dtype)
        autocast: Callable[[], Any] = contextlib.nullcontext
    else:
        if world > 1:
            broadcast_parameters(model)
        if low_dtype is not None:
            autocast = lambda: torch.autocast(device.type, dtype=low_dtype)  # noqa: E731
        else:
            autocast = contextlib.nullcontext
    model.train()

    trainable = getattr(stage, "trainable", None)
    params = list(trainable(model)) if trainable else [p for p in model.parameters()]
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("stage: the model has no trainable parameters")
    optimizer = build_optimizer(model, params, cfg)
    init_optimizer_state(optimizer)  # every parameter's state exists in every checkpoint
    scheduler = build_scheduler(
        optimizer,
        warmup_steps=cfg.warmup_steps,
        max_steps=cfg.max_steps,
        min_lr_ratio=cfg.min_lr_ratio,
    )

    # Frozen modules rebuilt from files (Stage II/III's SeTok, Stage III's base): not stored
    # in checkpoints; their path and SHA-256 are, and resume refuses other bytes.
    sources = getattr(stage, "frozen_sources", None)
    frozen = frozen_record(sources()) if callable(sources) else None

    step, data_position, skipped, in_row = 0, 0, 0, 0
    resumed_from = 0
    ckpt_path, rejected = resume_checkpoint(run_dir) if cfg.resume else (None, [])
    if ckpt_path is not None:
        data_position = resume_data_position(
            read_trainer_state(ckpt_path), ckpt_path, world_size=world,
            micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum,
            policy=cfg.world_size_change,
        )  # fmt: skip
        state = load_checkpoint(ckpt_path, model, optimizer, seed=cfg.seed, frozen=frozen)
        scheduler.load_state_dict(state.scheduler)
        step = state.step
        skipped, in_row = state.skipped_steps, state.nonfinite_in_row
        resumed_from = step
    else:
        seed_all(cfg.seed + 1_000_003 * env.rank)  # per-rank stream for dropout etc.

    describe = getattr(stage, "describe", None)
    meta = {
        "trainer": dataclasses.asdict(cfg),
        "stage": describe() if describe else type(stage).__name__,
        "world_size": world,
        "env_source": env.source,
        "device": str(device),
        "fsdp": use_fsdp,
        "precision": str(low_dtype or torch.float32),
        "resumed_from": resumed_from,
        "rejected_checkpoints": rejected,
        "schedule": schedule,
    }
    if env.is_main:
        atomic_write_json(run_dir / "trainer.json", meta)
    logger = MetricsLogger(run_dir, active=env.is_main, wandb_cfg=wandb_cfg, config=meta)

    def save() -> Path:
        state = TrainerState(
            step=step,
            data_position=data_position,
            skipped_steps=skipped,
            nonfinite_in_row=in_row,
            world_size=world,
            scheduler=scheduler.state_dict(),
            micro_batch_size=cfg.micro_batch_size,
            grad_accum=cfg.grad_accum,
        )
        return save_checkpoint(run_dir, model, optimizer, state, cfg.keep_last, frozen)

    batches: Iterator[Any] = iter(
        stage.batches(env.rank, world, data_position, cfg.micro_batch_size)
    )
    samples_per_step = cfg.micro_batch_size * cfg.grad_accum * world
    bar = tqdm(
        total=cfg.max_steps,
        initial=step,
        disable=not (env.is_main and cfg.progress),
        desc="train",
        dynamic_ncols=True,
    )
    history: list[float] = []
    last_loss = float("nan")
    last_saved = resumed_from if ckpt_path is not None else -1
    preempted = False
    loop_start = time.perf_counter()
    steps_run = 0
    try:
        with PreemptionFlag() as flag:
            while step < cfg.max_steps:
                loss_sum = torch.zeros((), device=device, dtype=torch.float64)
                metric_sums: dict[str, float] = {}
                for micro in range(cfg.grad_accum):
                    last_micro = micro == cfg.grad_accum - 1
                    if use_fsdp:
                        model.set_requires_gradient_sync(last_micro)  # type: ignore[operator]
                    try:
                        batch = next(batches)
                    except StopIteration:
                        raise RuntimeError(
                            f"stage: batches() ran out at data position {data_position} "
                            f"(step {step}); stages must yield indefinitely"
                        ) from None
                    batch = to_device(batch, device)
                    with autocast():
                        loss, metrics = stage.loss(model, batch)
                    if loss.ndim != 0:
                        raise ValueError(
                            f"stage: loss must be a scalar, got shape {tuple(loss.shape)}"
                        )
                    (loss / cfg.grad_accum).backward()
                    loss_sum += loss.detach().double()
                    for key, value in metrics.items():
                        metric_sums[key] = metric_sums.get(key, 0.0) + float(value)
                    data_position += 1
                if not use_fsdp and world > 1:
                    allreduce_gradients(params, world)

                if world > 1:
                    dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
                step_loss = float(loss_sum) / (cfg.grad_accum * world)

                grad_norm = _grad_norm(params)
                finite = math.isfinite(step_loss) and bool(torch.isfinite(grad_norm))
                if finite:
                    if cfg.clip_grad > 0:
                        torch.nn.utils.clip_grads_with_norm_(params, cfg.clip_grad, grad_norm)
                    optimizer.step()
                    in_row = 0
                else:
                    skipped += 1
                    in_row += 1
                optimizer.zero_grad(set_to_none=True)
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                step += 1
                steps_run += 1
                last_loss = step_loss
                history.append(step_loss)

                if not finite:
                    logger.log(
                        {
                            "step": step,
                            "event": "nonfinite_skip",
                            "loss": step_loss,
                            "skipped_steps": skipped,
                            "in_row": in_row,
                        }
                    )
                    if in_row >= cfg.max_nonfinite_in_row:
                        raise NonFiniteLossError(
                            f"non-finite loss or gradient in {in_row} consecutive steps "
                            f"(last at step {step}, loss={step_loss}); aborting — lower the lr, "
                            f"enable clip_grad, or raise TrainerConfig.max_nonfinite_in_row"
                        )
                elapsed = time.perf_counter() - loop_start
                rate = steps_run * samples_per_step / max(elapsed, 1e-9)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    record = {
                        "step": step,
                        "loss": step_loss,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "samples_per_s": rate,
                        "skipped_steps": skipped,
                    }
                    record.update({k: v / cfg.grad_accum for k, v in metric_sums.items()})
                    logger.log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", sps=f"{rate:.1f}", refresh=False)

                if on_step is not None:
                    on_step(step, step_loss)
                if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                    save()
                    last_saved = step
                if _any_rank(flag.requested, world, device):
                    preempted = True
                    break
            loop_seconds = time.perf_counter() - loop_start
            final_path = None
            if (preempted or cfg.save_final) and last_saved != step:
                save()
                last_saved = step
            if last_saved == step:
                final_path = latest_checkpoint(run_dir)
            if preempted:
                logger.log({"step": step, "event": "preempted", "signal": flag.received})
    finally:
        bar.close()
        logger.close()

    return TrainResult(
        step=step,
        last_loss=last_loss,
        skipped_steps=skipped,
        checkpoint=final_path,
        preempted=preempted,
        resumed_from=resumed_from,
        loop_seconds=loop_seconds,
        samples_per_s=steps_run * samples_per_step / max(loop_seconds, 1e-9),
        world_size=world,
        signal=flag.received if preempted else None,
        history=history,
    )
