"""The AdamW of a training run, with a learning rate per parameter group.

Paper Table 7 gives Stage I two rates; a pretrained vision encoder that trains beside new
modules wants its own rate, so `TrainerConfig.lr_groups` maps globs over parameter names to
rates. A glob that matches no trainable parameter is an error (a typo would otherwise train
everything at the base rate without a word), and so is a parameter two globs claim.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from setokim.train.config import TrainerConfig


def param_groups(
    model: nn.Module, params: Sequence[nn.Parameter], base_lr: float, lr_groups: dict[str, float]
) -> list[dict[str, Any]]:
    """`params` split into optimizer groups: one per `lr_groups` glob (over the names of
    `model.named_parameters()`), the rest (first) at `base_lr`."""
    if not lr_groups:
        return [{"params": list(params), "lr": base_lr}]
    names = {id(p): name for name, p in model.named_parameters()}
    unnamed = [p for p in params if id(p) not in names]
    if unnamed:
        raise ValueError(
            f"TrainerConfig.lr_groups: {len(unnamed)} trainable parameter(s) are not in "
            "model.named_parameters(), so no glob can name them"
        )
    chosen: dict[str, list[nn.Parameter]] = {glob: [] for glob in lr_groups}
    rest: list[nn.Parameter] = []
    for p in params:
        name = names[id(p)]
        hits = [glob for glob in lr_groups if fnmatchcase(name, glob)]
        if len(hits) > 1:
            raise ValueError(f"TrainerConfig.lr_groups: parameter {name!r} matches {hits}")
        (chosen[hits[0]] if hits else rest).append(p)
    empty = [glob for glob, ps in chosen.items() if not ps]
    if empty:
        raise ValueError(
            f"TrainerConfig.lr_groups: {empty} match no trainable parameter (trainable "
            f"names look like {names[id(params[0])]!r})"
        )
    groups = [{"params": rest, "lr": base_lr, "name": "rest"}] if rest else []
    # the rest first: param_groups[0] is the base rate the loop logs
    groups += [{"params": ps, "lr": lr_groups[glob], "name": glob} for glob, ps in chosen.items()]
    return groups


def build_optimizer(
    model: nn.Module, params: Sequence[nn.Parameter], cfg: TrainerConfig
) -> torch.optim.AdamW:
    """AdamW over `params` with `cfg`'s rate, betas, eps, weight decay and lr_groups."""
    return torch.optim.AdamW(
        param_groups(model, params, cfg.lr, cfg.lr_groups),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
