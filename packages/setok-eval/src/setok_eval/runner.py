"""The eval runner: sharded, cached, resumable prediction, then one scoring pass on rank 0."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from setok_eval.adapters import Request
from setok_eval.cache import PredictionCache, prediction_key
from setok_eval.codec import decode_labels, encode_labels
from setok_eval.documents import format_prompt, load_documents, load_image
from setok_eval.io import stable_hash
from setok_eval.metrics.image import FeatureExtractor
from setok_eval.overlays import save_png, token_overlay
from setok_eval.registry import TaskSpec, load_task
from setok_eval.results import build_results, task_entry, write_results
from setok_eval.scoring import score_task


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else RANK/WORLD_SIZE (torchrun), else SLURM_PROCID/SLURM_NTASKS, else 0/1."""
    env = os.environ
    if rank is None:
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def _git_sha() -> str:
    if os.environ.get("SETOK_GIT_SHA"):
        return os.environ["SETOK_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _serialise(task: TaskSpec, output: Any, key: str, out_dir: Path, doc_id: str) -> Any:
    """Make an adapter output JSON-friendly (images go to PNG files beside the cache)."""
    if task.output == "text":
        if not isinstance(output, str):
            raise TypeError(
                f"task {task.name!r} doc {doc_id!r}: expected str, got {type(output).__name__}"
            )
        return output
    if task.output == "box":
        arr = np.asarray(output, dtype=np.float64).reshape(-1)
        if arr.size != 4:
            raise ValueError(
                f"task {task.name!r} doc {doc_id!r}: a box needs 4 numbers, got {arr.size}"
            )
        return arr.tolist()
    if task.output in ("mask", "tokens"):
        arr = np.asarray(output)
        labels = (
            arr.astype(bool).astype(np.int64) if task.output == "mask" else arr.astype(np.int64)
        )
        return encode_labels(labels)
    rel = Path("predictions") / task.name / "images" / f"{key}.png"
    img = np.asarray(output)
    if img.dtype != np.uint8:
        img = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    save_png(out_dir / rel, img)
    return rel.as_posix()


def _predict_task(
    adapter: Any,
    task: TaskSpec,
    docs: Sequence[dict[str, Any]],
    out_dir: Path,
    rank: int,
    world_size: int,
    batch_size: int,
    fingerprint: str,
    progress: bool,
) -> None:
    method = getattr(adapter, task.method, None)
    if not callable(method):
        raise AttributeError(
            f"adapter {type(adapter).__name__} has no method {task.method!r}, needed by task {task.name!r}"
        )
    cache = PredictionCache(out_dir / "predictions" / task.name, rank)
    cache.repair()
    done = cache.load()
    pending = []
    for doc in docs[rank::world_size]:
        prompt = format_prompt(task, doc)
        key = prediction_key(
            task.name, task.version, doc["id"], prompt, task.generation, fingerprint
        )
        if key not in done:
            pending.append(Request(task.name, doc["id"], prompt, doc, dict(task.generation)))
    bar = tqdm(total=len(pending), desc=f"{task.name} [rank {rank}]", disable=not progress)
    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]
        outputs = list(method(batch))
        if len(outputs) != len(batch):
            raise ValueError(
                f"adapter.{task.method} returned {len(outputs)} outputs for {len(batch)} requests (task {task.name!r})"
            )
        for req, output in zip(batch, outputs, strict=True):
            key = prediction_key(
                task.name, task.version, req.doc_id, req.prompt, task.generation, fingerprint
            )
            value = _serialise(task, output, key, out_dir, req.doc_id)
            cache.append({"key": key, "task": task.name, "id": req.doc_id, "prediction": value})
            bar.update(1)
    bar.close()


def _collect(
    task: TaskSpec,
    docs: Sequence[dict[str, Any]],
    out_dir: Path,
    fingerprint: str,
    timeout_s: float,
) -> dict[str, Any]:
    """Wait until every document's prediction is in the merged cache, then return them by id."""
    keys = {
        d["id"]: prediction_key(
            task.name, task.version, d["id"], format_prompt(task, d), task.generation, fingerprint
        )
        for d in docs
    }
    deadline = time.monotonic() + timeout_s
    cache = PredictionCache(out_dir / "predictions" / task.name, rank=0)
    while True:
        records = cache.load()
        missing = [i for i, k in keys.items() if k not in records]
        if not missing:
            return {i: records[k]["prediction"] for i, k in keys.items()}
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"task {task.name!r}: {len(missing)} predictions still missing after {timeout_s:.0f}s "
                f"(other ranks unfinished?), e.g. {missing[:5]}"
            )
        time.sleep(min(5.0, max(0.1, timeout_s / 100)))


def _write_overlays(
    task: TaskSpec, docs: Sequence[dict], preds: Mapping[str, Any], out_dir: Path, n: int
) -> None:
    for doc in docs[:n]:
        if not isinstance(doc.get("image"), str):
            return
        overlay = token_overlay(load_image(doc["image"]), decode_labels(preds[doc["id"]]))
        save_png(out_dir / "overlays" / task.name / f"{doc['id']}.png", overlay)


def run_eval(
    adapter: Any,
    tasks: Sequence[TaskSpec | str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    rank: int | None = None,
    world_size: int | None = None,
    data_root: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    extractors: Mapping[str, FeatureExtractor] | None = None,
    llm_config: Mapping[str, Any] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    config_hash: str | None = None,
    git_sha: str | None = None,
    score: bool = True,
    wait_timeout_s: float = 3600.0,
    n_overlays: int = 4,
    progress: bool = True,
) -> dict | None:
    """Evaluate `adapter` on `tasks`, writing predictions and `out_dir/results.json`.

    Every rank predicts its shard (documents sorted by id, every world_size-th one), appending
    each prediction to its cache file as it is made; a rerun skips cached keys. Rank 0 then
    waits for all shards, scores each task once on the merged predictions and writes
    results.json atomically; it returns the results dict (other ranks return None).
    """
    rank, world_size = resolve_rank(rank, world_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = [t if isinstance(t, TaskSpec) else load_task(t) for t in tasks]
    if not specs:
        raise ValueError("tasks is empty")
    fingerprint = str(adapter.fingerprint())
    loaded = []
    for task in specs:
        docs, data_version = load_documents(task, data_root)
        if limit is not None:
            docs = docs[:limit]
        if not docs:
            raise ValueError(f"task {task.name!r} has no documents")
        loaded.append((task, docs, data_version))
    for task, docs, _ in loaded:
        _predict_task(adapter, task, docs, out, rank, world_size, batch_size, fingerprint, progress)
    if rank != 0 or not score:
        return None
    entries = {}
    for task, docs, data_version in loaded:
        preds = _collect(task, docs, out, fingerprint, wait_timeout_s)
        scored = score_task(task, docs, preds, out, extractors=extractors, llm_config=llm_config)
        entries[task.name] = task_entry(task, data_version, scored, n_resamples, seed)
        if task.output == "tokens" and n_overlays > 0:
            _write_overlays(task, docs, preds, out, n_overlays)
    if config_hash is None:
        config_hash = stable_hash(
            {
                "tasks": [(t.name, t.version, t.prompt, dict(t.generation)) for t, _, _ in loaded],
                "model": fingerprint,
                "limit": limit,
            }
        )
    results = build_results(
        entries,
        fingerprint=fingerprint,
        config_hash=config_hash,
        git_sha=git_sha or _git_sha(),
        world_size=world_size,
    )
    write_results(out, results)
    return results
