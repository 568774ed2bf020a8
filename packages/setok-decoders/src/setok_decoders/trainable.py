"""Which parameters train, by glob patterns over parameter names.

Stage I's sub-phases are configuration: sub-phase 1 trains the merger, the mapper and the
U-Net's cross-attention keys/values only. The functions work on any module (e.g. an
nn.ModuleDict holding tokenizer and decoders) so the stage can freeze everything in one
place and print what trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

UNET_PATTERNS: dict[str, list[str]] = {
    "all": ["*"],
    "cross_kv": ["*attn2.to_k.*", "*attn2.to_v.*"],
    "none": [],
}


def trainable_parameter_names(module: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the parameters of `module` that match any glob pattern."""
    return [
        name
        for name, _ in module.named_parameters()
        if any(fnmatchcase(name, pattern) for pattern in patterns)
    ]


def set_trainable(module: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Unfreeze exactly the parameters matching `patterns`, freeze the rest; return names.

    A pattern that matches nothing raises, so a typo cannot silently freeze a module.
    """
    names = {name for name, _ in module.named_parameters()}
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in names):
            raise ValueError(f"trainable pattern {pattern!r} matches no parameter")
    chosen = set(trainable_parameter_names(module, patterns))
    for name, param in module.named_parameters():
        param.requires_grad_(name in chosen)
    return sorted(chosen)


def trainable_table(module: nn.Module, depth: int = 2) -> str:
    """A text table of trainable/total parameter counts grouped by the first `depth` name parts."""
    groups: dict[str, list[int]] = {}
    for name, param in module.named_parameters():
        key = ".".join(name.split(".")[:depth])
        row = groups.setdefault(key, [0, 0])
        row[0] += param.numel() if param.requires_grad else 0
        row[1] += param.numel()
    width = max([len("module"), *(len(k) for k in groups)])
    lines = [f"{'module':<{width}}  {'trainable':>12}  {'total':>12}"]
    for key, (train, total) in groups.items():
        lines.append(f"{key:<{width}}  {train:>12,}  {total:>12,}")
    train_all = sum(r[0] for r in groups.values())
    total_all = sum(r[1] for r in groups.values())
    lines.append(f"{'TOTAL':<{width}}  {train_all:>12,}  {total_all:>12,}")
    return "\n".join(lines)
