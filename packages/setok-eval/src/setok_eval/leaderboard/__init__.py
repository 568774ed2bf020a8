"""Leaderboards over evaluated runs: markdown, CSV and a static HTML page with plots."""

from __future__ import annotations

import os
from pathlib import Path

from setok_eval.leaderboard.compare import (
    MixedDataError,
    build_tables,
    check_data_versions,
    load_runs,
)
from setok_eval.leaderboard.plots import forest_plot, tokens_histogram
from setok_eval.leaderboard.render import copy_overlays, csv_text, html_page, markdown, write_text

__all__ = ["MixedDataError", "build_leaderboard"]


def build_leaderboard(
    run_dirs: list[str | os.PathLike[str]],
    baseline: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    allow_mixed_data: bool = False,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Path]:
    """Compare runs against `baseline` (a path among, or added to, `run_dirs`, or a run name)
    and write leaderboard.md, leaderboard.csv, index.html and figures into `out_dir`."""
    paths = [Path(p) for p in run_dirs]
    base_path = Path(baseline)
    runs = load_runs(paths)
    base = next(
        (r for r in runs if r.path.resolve() == base_path.resolve() or r.name == str(baseline)),
        None,
    )
    if base is None:
        if not base_path.exists():
            raise FileNotFoundError(f"baseline {baseline!r} is neither a given run name nor a path")
        runs = load_runs([base_path, *paths])
        base = runs[0]
    notes = check_data_versions(runs, allow_mixed_data)
    tables = build_tables(runs, base, n_resamples=n_resamples, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path] = {}
    if forest_plot(tables, runs, base, out / "forest.png"):
        figures["Delta vs baseline"] = out / "forest.png"
    if tokens_histogram(runs, out / "tokens_per_image.png"):
        figures["Tokens per image"] = out / "tokens_per_image.png"
    overlays = copy_overlays(runs, out)
    md_figs = {k: v.name for k, v in figures.items()}
    for run_name, files in overlays.items():
        for f in files:
            md_figs[f"Token overlay · {run_name} · {f.stem}"] = f.relative_to(out).as_posix()
    written = {
        "md": out / "leaderboard.md",
        "csv": out / "leaderboard.csv",
        "html": out / "index.html",
    }
    write_text(written["md"], markdown(tables, runs, base, notes, md_figs))
    write_text(written["csv"], csv_text(tables, runs, base))
    write_text(written["html"], html_page(tables, runs, base, notes, figures, overlays))
    return written
