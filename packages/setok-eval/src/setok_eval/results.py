"""`results.json`: the one file per evaluated run that leaderboards read.

Schema (version 1):
  schema, created, model{fingerprint}, config_hash, git_sha, data_version (hash over tasks),
  world_size, tasks{name: {family, version, output, data_version, n, primary,
  higher_is_better, metrics{name: {value, ci95, n, higher_is_better, reducer, details}},
  items{metric: {ids, reducer, states}}}}
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from setok_eval.io import atomic_write_json, stable_hash

SCHEMA_VERSION = 1
RESULTS_NAME = "results.json"


def task_entry(
    task: Any, data_version: str, scored: Mapping[str, Any], n_resamples: int, seed: int
) -> dict:
    """The results entry of one task from its scored metrics."""
    metrics, items = {}, {}
    for spec in task.metrics:
        s = scored[spec.name]
        metrics[spec.name] = {
            "value": float(s.value),
            "ci95": s.interval(n_resamples, seed),
            "n": len(s.ids),
            "higher_is_better": spec.higher_is_better,
            "reducer": s.reducer,
            "details": s.details,
        }
        if s.states is not None:
            st = s.states
            items[spec.name] = {
                "ids": s.ids,
                "reducer": s.reducer,
                "states": st[:, 0].tolist() if st.shape[1] == 1 else st.tolist(),
            }
    return {
        "family": task.family,
        "version": task.version,
        "output": task.output,
        "data_version": data_version,
        "n": len(scored[task.primary].ids),
        "primary": task.primary,
        "higher_is_better": task.higher_is_better,
        "metrics": metrics,
        "items": items,
    }


def build_results(
    tasks: Mapping[str, dict], *, fingerprint: str, config_hash: str, git_sha: str, world_size: int
) -> dict:
    """Assemble the top-level results object."""
    return {
        "schema": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": {"fingerprint": fingerprint},
        "config_hash": config_hash,
        "git_sha": git_sha,
        "data_version": stable_hash({k: v["data_version"] for k, v in sorted(tasks.items())}),
        "world_size": world_size,
        "tasks": dict(tasks),
    }


def write_results(out_dir: str | os.PathLike[str], results: Mapping[str, Any]) -> Path:
    """Atomically write `out_dir/results.json`."""
    return atomic_write_json(Path(out_dir) / RESULTS_NAME, dict(results))


def find_results(path: str | os.PathLike[str]) -> Path:
    """Accept a results.json, an eval out_dir, or a run dir holding eval/results.json."""
    p = Path(path)
    for candidate in (p, p / RESULTS_NAME, p / "eval" / RESULTS_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {RESULTS_NAME} at {p} (nor {p / 'eval' / RESULTS_NAME})")


def read_results(path: str | os.PathLike[str]) -> dict:
    """Load and sanity-check a results file (clear error on a wrong schema)."""
    f = find_results(path)
    data = json.loads(f.read_text(encoding="utf-8"))
    if data.get("schema") != SCHEMA_VERSION or "tasks" not in data:
        raise ValueError(f"{f}: not a setok-eval results file of schema {SCHEMA_VERSION}")
    data["_path"] = str(f)
    return data


def item_states(
    task_result: Mapping[str, Any], metric: str
) -> tuple[list[str], np.ndarray, str] | None:
    """(ids, states (N, k), reducer) of a metric, or None when it has no per-item states."""
    entry = task_result.get("items", {}).get(metric)
    if entry is None:
        return None
    states = np.asarray(entry["states"], dtype=np.float64)
    return list(entry["ids"]), states.reshape(len(entry["ids"]), -1), entry["reducer"]
