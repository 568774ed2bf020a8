"""Learning-rate schedule: linear warmup, then cosine decay to a floor (paper Table 7)."""

from __future__ import annotations

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier after `step` completed optimizer steps.

    Warmup ramps (step+1)/warmup_steps up to 1; then cosine from 1 down to `min_lr_ratio`,
    reached at `max_steps` and held after.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, max_steps: int, min_lr_ratio: float
) -> LambdaLR:
    """A LambdaLR over `warmup_cosine`; its state_dict is plain JSON-able data."""
    fn = functools.partial(
        warmup_cosine, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio
    )
    return LambdaLR(optimizer, lr_lambda=fn)
