"""Trainer configuration: plain dataclasses, usable directly as Hydra structured schemas.

Validation lives in `__post_init__`, so `OmegaConf.to_object(cfg)` (what the launcher
does before queueing anything) fails with the offending key's name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

MIXED_PRECISION_CHOICES = ("auto", "bf16", "fp32")
FSDP_CHOICES = ("auto", "on", "off")
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
    stage's epoch size and the world size are known; trainer.json records the result.
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
        _require(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}")
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


class EpochSize(int):
    """Samples in one epoch (all ranks) that also knows the exact micro-batches per rank.

    An int, so it reads and serialises as the sample count (trainer.json) wherever a count
    is expected. A task mix fills one batch per task, so a rank's epoch is
    sum over tasks of (items drawn for the task // micro_batch_size), and with every rank
    kept to the same count, the smallest rank's: `rank_items` (one {task: items} per rank)
    gives that. Without it, each rank reads int // world_size samples of one item each.
    """

    rank_items: tuple[dict[str, int], ...] | None

    def __new__(
        cls, samples: int, rank_items: Sequence[Mapping[str, int]] | None = None
    ) -> EpochSize:
        out = super().__new__(cls, samples)
        out.rank_items = None if rank_items is None else tuple(dict(r) for r in rank_items)
        return out

    def __getnewargs__(self) -> tuple[int, tuple[dict[str, int], ...] | None]:
        return int(self), self.rank_items

    def micro_batches(self, micro_batch_size: int, world_size: int) -> int:
        """Full micro-batches each rank reads in the epoch."""
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size: must be >= 1, got {micro_batch_size}")
        if self.rank_items is None:
            return (int(self) // world_size) // micro_batch_size
        if len(self.rank_items) != world_size:
            raise ValueError(
                f"world_size: the epoch was counted for {len(self.rank_items)} ranks, got {world_size}"
            )
        return min(sum(n // micro_batch_size for n in r.values()) for r in self.rank_items)


def resolve_schedule(cfg: TrainerConfig, num_samples: int | None, world_size: int) -> TrainerConfig:
    """`cfg` with max_steps / warmup_steps derived from epochs / warmup_ratio when set.

    num_samples: samples in one epoch of the stage's data, summed over all ranks (what the
    stage's batch stream reads in one pass; None when the stage has no finite epoch).
    Every rank reads num_samples // world_size of them and drops a partial micro-batch at
    the end of an epoch (`stages.common.endless_batches`), so with
    m = (num_samples // world_size) // micro_batch_size micro-batches per rank and epoch
    (an `EpochSize` gives m itself: `micro_batches`, exact for a task mix's first epoch):
    max_steps = floor(epochs * m / grad_accum), i.e. about epochs * num_samples / global
    batch (micro_batch_size * grad_accum * world_size); warmup_steps =
    ceil(warmup_ratio * max_steps) (the Hugging Face Trainer's rounding). Fields that are
    None leave max_steps / warmup_steps as configured. Raises naming the field.
    """
    if world_size < 1:
        raise ValueError(f"world_size: must be >= 1, got {world_size}")
    max_steps, warmup_steps = cfg.max_steps, cfg.warmup_steps
    if cfg.epochs is not None:
        if num_samples is None:
            raise ValueError(
                "TrainerConfig.epochs: this stage's data has no finite epoch; "
                "set max_steps instead (epochs=null)"
            )
        if num_samples < 0:
            raise ValueError(f"num_samples: must be >= 0, got {num_samples}")
        if isinstance(num_samples, EpochSize):
            micro = num_samples.micro_batches(cfg.micro_batch_size, world_size)
        else:
            micro = (num_samples // world_size) // cfg.micro_batch_size
        max_steps = math.floor(cfg.epochs * micro / cfg.grad_accum + 1e-9)
        batch = cfg.micro_batch_size * cfg.grad_accum * world_size
        _require(
            max_steps >= 1,
            "epochs",
            f"{cfg.epochs:g} epoch(s) of {num_samples} samples is less than one optimizer "
            f"step of {batch} samples (micro_batch_size {cfg.micro_batch_size} x grad_accum "
            f"{cfg.grad_accum} x world_size {world_size})",
        )
    if cfg.warmup_ratio is not None:
        warmup_steps = math.ceil(cfg.warmup_ratio * max_steps - 1e-9)
    if (max_steps, warmup_steps) == (cfg.max_steps, cfg.warmup_steps):
        return cfg
    return replace(cfg, max_steps=max_steps, warmup_steps=warmup_steps)
