"""Bootstrap intervals and paired comparisons of two runs on the same items.

A metric is summarised by per-item *states* (rows) and a named *reducer* that turns any subset
of rows into the metric value, so corpus metrics (F1, cIoU, MME) are recomputed exactly on every
resample; CIDEr-D, whose idf depends on the corpus, supplies its own resample statistic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from setok_eval.metrics.mme import mme_from_states
from setok_eval.metrics.pope import pope_from_confusion
from setok_eval.metrics.segmentation import ciou_from_states, giou_from_states

Reducer = Callable[[np.ndarray], float]


def _mean(states: np.ndarray) -> float:
    return float(np.asarray(states, dtype=np.float64).reshape(len(states), -1)[:, 0].mean())


REDUCERS: dict[str, Reducer] = {
    "mean": _mean,
    "giou": giou_from_states,
    "ciou": ciou_from_states,
    "pope_accuracy": lambda s: pope_from_confusion(s)["accuracy"],
    "pope_precision": lambda s: pope_from_confusion(s)["precision"],
    "pope_recall": lambda s: pope_from_confusion(s)["recall"],
    "pope_f1": lambda s: pope_from_confusion(s)["f1"],
    "pope_yes_ratio": lambda s: pope_from_confusion(s)["yes_ratio"],
    "mme_total": lambda s: mme_from_states(s)["total"],
}


def reduce_states(states: np.ndarray, reducer: str) -> float:
    """Apply the named reducer; a clear error for unknown names."""
    if reducer not in REDUCERS:
        raise KeyError(f"unknown reducer {reducer!r}; known: {sorted(REDUCERS)}")
    return REDUCERS[reducer](np.asarray(states, dtype=np.float64))


def is_binary(states: np.ndarray, reducer: str) -> bool:
    """True when the metric is a mean of 0/1 per-item scores (McNemar applies)."""
    s = np.asarray(states, dtype=np.float64)
    return (
        reducer == "mean"
        and s.ndim <= 2
        and bool(np.isin(s.reshape(len(s), -1)[:, 0], (0, 1)).all())
    )


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n: int,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(indices)` over resamples of n items."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(n_resamples)])
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def states_ci(
    states: np.ndarray, reducer: str, *, n_resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% bootstrap interval of a reducer over per-item states."""
    s = np.asarray(states, dtype=np.float64)
    return bootstrap_ci(
        lambda idx: reduce_states(s[idx], reducer), len(s), n_resamples=n_resamples, seed=seed
    )


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value for paired 0/1 outcomes (binomial test on discordant pairs)."""
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes differ in shape: {a.shape} vs {b.shape}")
    only_a = int((a & ~b).sum())
    only_b = int((~a & b).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(sps.binomtest(only_a, only_a + only_b, 0.5).pvalue)


@dataclass(frozen=True)
class PairedResult:
    """Run B minus run A on the same items."""

    delta: float
    ci95: tuple[float, float]
    p_value: float
    method: str
    n: int


def paired_compare(
    states_a: np.ndarray,
    states_b: np.ndarray,
    reducer: str,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> PairedResult:
    """Delta (b - a) with a paired-bootstrap interval; p-value from exact McNemar for 0/1 scores,
    otherwise from the paired bootstrap (share of centred resampled deltas at least as extreme)."""
    a = np.asarray(states_a, dtype=np.float64)
    b = np.asarray(states_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"states_a {a.shape} and states_b {b.shape} are not paired")
    if len(a) == 0:
        raise ValueError("no paired items")
    delta = reduce_states(b, reducer) - reduce_states(a, reducer)
    rng = np.random.default_rng(seed)
    deltas = np.empty(n_resamples)
    for r in range(n_resamples):
        idx = rng.integers(0, len(a), len(a))
        deltas[r] = reduce_states(b[idx], reducer) - reduce_states(a[idx], reducer)
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    if is_binary(a, reducer) and is_binary(b, reducer):
        p, method = (
            mcnemar_exact(a.reshape(len(a), -1)[:, 0], b.reshape(len(b), -1)[:, 0]),
            "mcnemar",
        )
    else:
        extreme = np.abs(deltas - delta) >= abs(delta) - 1e-12
        p, method = float((1 + extreme.sum()) / (1 + n_resamples)), "paired_bootstrap"
        if delta == 0:
            p = 1.0
    return PairedResult(float(delta), (float(lo), float(hi)), float(p), method, len(a))
