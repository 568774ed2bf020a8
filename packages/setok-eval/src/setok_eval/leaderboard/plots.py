"""Leaderboard figures (matplotlib, Agg backend): delta forest plot, tokens-per-image histogram."""

from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from setok_eval.io import atomic_write_bytes  # noqa: E402
from setok_eval.leaderboard.compare import FamilyTable, Run  # noqa: E402
from setok_eval.results import item_states  # noqa: E402


def _save(fig, path: str | os.PathLike[str]) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def forest_plot(
    tables: list[FamilyTable], runs: list[Run], baseline: Run, path: str | os.PathLike[str]
) -> bool:
    """Delta vs baseline with 95% intervals, one row per (run, task primary metric)."""
    rows = []
    for table in tables:
        for col in table.columns:
            if not col.primary:
                continue
            for run in runs:
                cell = table.cells.get((run.name, col.task, col.metric))
                if run is baseline or cell is None or cell.delta is None:
                    continue
                lo, hi = cell.delta_ci95 if cell.delta_ci95 else (cell.delta, cell.delta)
                rows.append((f"{run.name} · {col.task}/{col.metric}", cell.delta, lo, hi))
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    y = np.arange(len(rows))[::-1]
    deltas = np.array([r[1] for r in rows])
    err = np.array([[r[1] - r[2] for r in rows], [r[3] - r[1] for r in rows]])
    ax.errorbar(deltas, y, xerr=np.clip(err, 0, None), fmt="o", color="tab:blue", capsize=3)
    ax.axvline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(y, [r[0] for r in rows])
    ax.set_xlabel(f"delta vs {baseline.name} (95% paired bootstrap interval)")
    ax.set_title("Delta vs baseline")
    _save(fig, path)
    return True


def tokens_histogram(runs: list[Run], path: str | os.PathLike[str]) -> bool:
    """Overlaid histograms of visual tokens per image for every run with a tokens task."""
    series = []
    for run in runs:
        for task, entry in sorted(run.results["tasks"].items()):
            for metric, m in entry["metrics"].items():
                if m.get("details", {}).get("hist_counts") is None:
                    continue
                got = item_states(entry, metric)
                if got is not None:
                    series.append((f"{run.name} · {task}", got[1][:, 0]))
    if not series:
        return False
    lo = min(s.min() for _, s in series)
    hi = max(s.max() for _, s in series)
    bins = np.arange(np.floor(lo), np.ceil(hi) + 2) - 0.5
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, counts in series:
        ax.hist(counts, bins=bins, alpha=0.5, label=f"{label} (mean {counts.mean():.1f})")
    ax.set_xlabel("visual tokens per image")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True
