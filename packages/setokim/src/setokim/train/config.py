"""Trainer configuration: plain dataclasses, usable directly as Hydra structured schemas.

Validation lives in `__post_init__`, so `OmegaConf.to_object(cfg)` (what the launcher
does before queueing anything) fails with the offending key's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

MIXED_PRECISION_CHOICES = ("auto", "bf16", "fp32")
FSDP_CHOICES = ("auto", "on", "off")
WORLD_SIZE_CHANGE_CHOICES = ("refuse", "reshard")
WANDB_MODES = ("offline", "online", "disabled")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"TrainerConfig.{key}: {message}")


@dataclass
class WandbConfig:
    """Weights & Biases run settings; only rank 0 ever calls wandb.init (dir = the run dir)."""

    mode: str = "offline"
    project: str = "setok"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ValueError(f"WandbConfig.mode: expected one of {WANDB_MODES}, got {self.mode!r}")
        self.tags = [str(t) for t in self.tags]


@dataclass
class TrainerConfig:
    """Everything the training loop needs that is not the model, data or loss.

    Batch semantics: one optimizer step consumes `grad_accum` micro-batches of
    `micro_batch_size` samples on every rank, so the global batch is
    micro_batch_size * grad_accum * world_size.
    LR: linear warmup from 0 over `warmup_steps`, then cosine from `lr` to `lr * min_lr_ratio`
    at `max_steps` (paper Table 7 style).
    `ckpt_every=0` disables periodic checkpoints (a final one and a preemption one are still
    written); `keep_last` keeps that many step directories.
    `mixed_precision="auto"` is bf16 on GPU and fp32 on CPU; `fsdp="auto"` shards (FSDP2)
    when world_size > 1.
    Epoch-based schedules (paper Table 7 gives epochs and a warmup ratio, not steps): when
    `epochs` is set, `max_steps` is derived from it and the configured value is replaced;
    when `warmup_ratio` is set, `warmup_steps` is derived from it (after max_steps) and
    replaced. The loop derives both at the start of a run (`resolve_schedule`), once the
    stage's micro-batches per epoch and the world size are known; trainer.json records
    the result.
    """

    max_steps: int = 100
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    clip_grad: float = 1.0  # <= 0 disables clipping (the norm is still logged)
    seed: int = 0
    ckpt_every: int = 0
    keep_last: int = 2
    log_every: int = 10
    max_nonfinite_in_row: int = 5
    mixed_precision: str = "auto"
    activation_checkpointing: bool = False
    fsdp: str = "auto"
    progress: bool = True
    resume: bool = True  # pick up run_dir/checkpoints/latest when it exists
    save_final: bool = True  # checkpoint at max_steps so a relaunch finishes at once
    epochs: float | None = None  # passes over the stage's data; replaces max_steps
    warmup_ratio: float | None = None  # fraction of max_steps; replaces warmup_steps
    # Learning rate per parameter group: glob over trainable parameter names -> lr (e.g.
    # {"setok.encoder.*": 1e-3}); the rest train at `lr`, all on the same warmup/cosine.
    lr_groups: dict[str, float] = field(default_factory=dict)
    # Resuming a checkpoint written by another number of ranks: "refuse" (an error naming
    # both world sizes) or "reshard" (DCP reshards weights and optimizer; allowed only when
    # the global batch is unchanged; see checkpoint.resume_data_position).
    world_size_change: str = "refuse"

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # OmegaConf hands back a list
        _require(self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        _require(
            self.micro_batch_size >= 1,
            "micro_batch_size",
            f"must be >= 1, got {self.micro_batch_size}",
        )
        _require(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        _require(self.lr > 0 and math.isfinite(self.lr), "lr", f"must be > 0, got {self.lr}")
        self.lr_groups = {str(k): float(v) for k, v in dict(self.lr_groups).items()}
        for glob, lr in self.lr_groups.items():
            _require(
                lr > 0 and math.isfinite(lr), f"lr_groups[{glob!r}]", f"must be > 0, got {lr}"
            )
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            "betas",
            f"must be two numbers in [0, 1), got {self.betas}",
        )
        _require(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        _require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(
            0.0 <= self.min_lr_ratio <= 1.0,
            "min_lr_ratio",
            f"must be in [0, 1], got {self.min_lr_ratio}",
        )
        _require(self.ckpt_every >= 0, "ckpt_every", f"must be >= 0, got {self.ckpt_every}")
        _require(
            self.keep_last >= 2,
            "keep_last",
            f"must be >= 2 (a checkpoint that fails verification falls back to the one "
            f"before it), got {self.keep_last}",
        )
        _require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        _require(
            self.max_nonfinite_in_row >= 1,
            "max_nonfinite_in_row",
            f"must be >= 1, got {self.max_nonfinite_in_row}",
        )
        _require(
            self.mixed_precision in MIXED_PRECISION_CHOICES,
            "mixed_precision",
            f"expected one of {MIXED_PRECISION_CHOICES}, got {self.mixed_precision!r}",
        )
        _require(
            self.fsdp in FSDP_CHOICES,
            "fsdp",
            f"expected one of {FSDP_CHOICES}, got {self.fsdp!r}",
        )
        _require(
            self.world_size_change in WORLD_SIZE_CHANGE_CHOICES,
            "world_size_change",
            f"expected one of {WORLD_SIZE_CHANGE_CHOICES}, got {self.world_size_change!r}",
        )
        if self.epochs is not None:
            self.epochs = float(self.epochs)
            _require(
                math.isfinite(self.epochs) and self.epochs > 0,
                "epochs",
                f"must be > 0 (or null to use max_steps), got {self.epochs}",
            )
        if self.warmup_ratio is not None:
            self.warmup_ratio = float(self.warmup_ratio)
            _require(
                0.0 <= self.warmup_ratio < 1.0,
                "warmup_ratio",
                f"must be in [0, 1) (or null to use warmup_steps), got {self.warmup_ratio}",
            )


def resolve_schedule(
    cfg: TrainerConfig, epoch_batches: int | None, world_size: int
) -> TrainerConfig:
    """`cfg` with max_steps / warmup_steps derived from epochs / warmup_ratio when set.

    epoch_batches: full micro-batches each rank reads in one epoch of the stage's data (what
    `stages.common.endless_batches` yields per epoch, the same on every rank; None when the
    stage has no finite epoch). max_steps = floor(epochs * epoch_batches / grad_accum), i.e.
    about epochs * samples / global batch (micro_batch_size * grad_accum * world_size);
    warmup_steps = ceil(warmup_ratio * max_steps) (the Hugging Face Trainer's rounding).
    Fields that are None leave max_steps / warmup_steps as configured. Raises naming the field.
    """
    if world_size < 1:
        raise ValueError(f"world_size: must be >= 1, got {world_size}")
    max_steps, warmup_steps = cfg.max_steps, cfg.warmup_steps
    if cfg.epochs is not None:
        if epoch_batches is None:
            raise ValueError(
                "TrainerConfig.epochs: this stage's data has no finite epoch; "
                "set max_steps instead (epochs=null)"
            )
        if epoch_batches < 0:
            raise ValueError(f"epoch_batches: must be >= 0, got {epoch_batches}")
        max_steps = math.floor(cfg.epochs * epoch_batches / cfg.grad_accum + 1e-9)
        batch = cfg.micro_batch_size * cfg.grad_accum * world_size
        _require(
            max_steps >= 1,
            "epochs",
            f"{cfg.epochs:g} epoch(s) of {epoch_batches} micro-batch(es) per rank is less "
            f"than one optimizer step of {batch} samples (micro_batch_size "
            f"{cfg.micro_batch_size} x grad_accum {cfg.grad_accum} x world_size {world_size})",
        )
    if cfg.warmup_ratio is not None:
        warmup_steps = math.ceil(cfg.warmup_ratio * max_steps - 1e-9)
    if (max_steps, warmup_steps) == (cfg.max_steps, cfg.warmup_steps):
        return cfg
    return replace(cfg, max_steps=max_steps, warmup_steps=warmup_steps)
