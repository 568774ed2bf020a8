"""Expand an experiment's sweep into named jobs: variants x grid x command-line sweeps.

An `exp` file declares either or both of
    variants: {dynamic_hard: [tokenizer.clustering.mechanism=dynamic, ...], ...}
    sweep: {trainer.seed: [0, 1], tokenizer: [tiny_vit, tiny_convnext]}
and a command-line override `key=a,b` (Hydra's sweep syntax) adds one more grid axis.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from setok_experiments.overrides import (
    OverrideError,
    ParsedOverride,
    format_value,
    parse_overrides,
)


@dataclass(frozen=True)
class Variant:
    """One job of the sweep: a display name and the overrides that make it."""

    name: str
    overrides: tuple[str, ...]


def _short(key: str) -> str:
    return key.split("@", 1)[0].rsplit(".", 1)[-1]


def expand_sweep(
    variants: Mapping[str, Sequence[str]],
    grid: Mapping[str, Sequence[Any]],
    cli_sweeps: Sequence[ParsedOverride] = (),
) -> list[Variant]:
    """Cartesian product, in declaration order: variants outermost, then grid keys."""
    axes: list[list[tuple[str, tuple[str, ...]]]] = []
    if variants:
        axis = []
        for name, overrides in variants.items():
            parse_overrides(list(overrides))  # fail early, naming the bad line
            axis.append((str(name), tuple(str(o) for o in overrides)))
        axes.append(axis)
    swept: set[str] = set()
    for key, values in grid.items():
        if not values:
            raise OverrideError(f"sweep.{key}: needs at least one value")
        rendered = [format_value(v) for v in values]
        axes.append([(f"{_short(key)}={r}", (f"{key}={r}",)) for r in rendered])
        swept.add(key)
    for item in cli_sweeps:
        if item.key in swept:
            raise OverrideError(f"override {item.key}: already swept by the experiment")
        axes.append([(f"{_short(item.key)}={v}", (item.line(v),)) for v in item.values])
        swept.add(item.key)

    out: list[Variant] = []
    for combo in itertools.product(*axes):
        name = ",".join(part for part, _ in combo) or "base"
        overrides = tuple(o for _, lines in combo for o in lines)
        out.append(Variant(name=name, overrides=overrides))
    return out


def swept_keys(variants: Mapping[str, Sequence[str]], grid: Mapping[str, Any]) -> set[str]:
    """Every key the experiment's sweep sets (to refuse a command line that fights it)."""
    keys = set(grid)
    for overrides in variants.values():
        keys.update(p.key for p in parse_overrides(list(overrides)))
    return keys
