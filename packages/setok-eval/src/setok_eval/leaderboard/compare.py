"""Compare evaluated runs: per task family, runs as rows, deltas vs a baseline with tests."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from setok_eval.results import item_states, read_results
from setok_eval.stats import paired_compare


class MixedDataError(ValueError):
    """Runs were evaluated on different data versions of the same task."""


@dataclass
class Run:
    """One evaluated run as the leaderboard sees it."""

    name: str
    path: Path
    results: dict[str, Any]

    @property
    def eval_dir(self) -> Path:
        return Path(self.results["_path"]).parent


@dataclass
class Cell:
    """One (run, task, metric) entry with its comparison to the baseline."""

    value: float
    ci95: list[float] | None
    n: int
    delta: float | None = None
    delta_ci95: tuple[float, float] | None = None
    p_value: float | None = None
    test: str | None = None
    best: bool = False


@dataclass
class Column:
    task: str
    metric: str
    higher_is_better: bool | None
    primary: bool


@dataclass
class FamilyTable:
    family: str
    columns: list[Column]
    cells: dict[tuple[str, str, str], Cell] = field(default_factory=dict)  # (run, task, metric)


def _run_name(path: Path) -> str:
    p = path.resolve()
    if p.name == "results.json":
        p = p.parent
    if p.name == "eval":
        p = p.parent
    return p.name


def load_runs(paths: list[str | os.PathLike[str]]) -> list[Run]:
    """Read every run's results.json; names are folder names made unique."""
    runs: list[Run] = []
    used: dict[str, int] = {}
    for raw in paths:
        p = Path(raw)
        results = read_results(p)
        name = _run_name(p)
        if name in used:
            used[name] += 1
            name = f"{name}-{used[name]}"
        else:
            used[name] = 1
        runs.append(Run(name, p, results))
    return runs


def check_data_versions(runs: list[Run], allow_mixed: bool) -> list[str]:
    """Raise MixedDataError when a task's data version differs across runs (unless allowed);
    returns human-readable notes about each mismatch."""
    notes = []
    versions: dict[str, dict[str, str]] = {}
    for run in runs:
        for task, entry in run.results["tasks"].items():
            versions.setdefault(task, {})[run.name] = entry["data_version"]
    for task, by_run in sorted(versions.items()):
        if len(set(by_run.values())) > 1:
            detail = ", ".join(f"{r}={v}" for r, v in sorted(by_run.items()))
            notes.append(f"task {task!r} was evaluated on different data versions: {detail}")
    if notes and not allow_mixed:
        raise MixedDataError("; ".join(notes) + " (pass --allow-mixed-data to compare anyway)")
    return notes


def _paired(base: dict, other: dict, metric: str, n_resamples: int, seed: int):
    a = item_states(base, metric)
    b = item_states(other, metric)
    if a is None or b is None or a[2] != b[2]:
        return None
    index_b = {i: k for k, i in enumerate(b[0])}
    common = [(k, index_b[i]) for k, i in enumerate(a[0]) if i in index_b]
    if not common:
        return None
    ia, ib = np.array([c[0] for c in common]), np.array([c[1] for c in common])
    return paired_compare(a[1][ia], b[1][ib], a[2], n_resamples=n_resamples, seed=seed)


def build_tables(
    runs: list[Run], baseline: Run, *, n_resamples: int = 1000, seed: int = 0
) -> list[FamilyTable]:
    """One table per task family with every metric of every task any run has."""
    columns: dict[str, dict[tuple[str, str], Column]] = {}
    for run in runs:
        for task, entry in sorted(run.results["tasks"].items()):
            fam = columns.setdefault(entry["family"], {})
            for metric, m in entry["metrics"].items():
                fam.setdefault(
                    (task, metric),
                    Column(task, metric, m.get("higher_is_better"), metric == entry["primary"]),
                )
    tables = []
    for family in sorted(columns):
        cols = sorted(columns[family].values(), key=lambda c: (c.task, not c.primary, c.metric))
        table = FamilyTable(family, cols)
        for col in cols:
            base_entry = baseline.results["tasks"].get(col.task)
            for run in runs:
                entry = run.results["tasks"].get(col.task)
                if entry is None or col.metric not in entry["metrics"]:
                    continue
                m = entry["metrics"][col.metric]
                cell = Cell(float(m["value"]), m.get("ci95"), int(m.get("n", entry["n"])))
                if (
                    run is not baseline
                    and base_entry is not None
                    and col.metric in base_entry["metrics"]
                ):
                    cell.delta = cell.value - float(base_entry["metrics"][col.metric]["value"])
                    res = _paired(base_entry, entry, col.metric, n_resamples, seed)
                    if res is not None:
                        cell.delta_ci95, cell.p_value, cell.test = res.ci95, res.p_value, res.method
                table.cells[(run.name, col.task, col.metric)] = cell
            present = [
                c for (r, t, mt), c in table.cells.items() if t == col.task and mt == col.metric
            ]
            if col.higher_is_better is not None and len(present) > 1:
                best = (max if col.higher_is_better else min)(c.value for c in present)
                for c in present:
                    c.best = c.value == best
        tables.append(table)
    return tables
