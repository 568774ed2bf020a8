"""POPE (object hallucination) metrics with the POPE script's answer-parsing rule."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def parse_pope_answer(text: str) -> int:
    """1 for "yes", 0 for "no", parsed as the POPE evaluation script does.

    Only the text before the first period counts; commas are removed; the answer is "no"
    when one of the space-separated words is exactly "No", "no" or "not", otherwise "yes".
    """
    if not isinstance(text, str):
        raise TypeError(f"prediction must be a str, got {type(text).__name__}")
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return 0 if ("No" in words or "not" in words or "no" in words) else 1


def _label(value: str | int | bool, index: int) -> int:
    if isinstance(value, bool | int | np.integer) and int(value) in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("yes", "no"):
        return 1 if value.strip().lower() == "yes" else 0
    raise ValueError(f"labels[{index}] must be 'yes'/'no' or 1/0, got {value!r}")


def pope_confusion(predictions: Sequence[str], labels: Sequence[str | int]) -> np.ndarray:
    """Per-item (tp, fp, tn, fn) rows, "yes" being the positive class."""
    if len(predictions) != len(labels):
        raise ValueError(
            f"predictions ({len(predictions)}) and labels ({len(labels)}) differ in length"
        )
    pred = np.array([parse_pope_answer(p) for p in predictions], dtype=np.int64)
    gold = np.array([_label(v, i) for i, v in enumerate(labels)], dtype=np.int64)
    return np.stack(
        [
            (pred == 1) & (gold == 1),
            (pred == 1) & (gold == 0),
            (pred == 0) & (gold == 0),
            (pred == 0) & (gold == 1),
        ],
        axis=1,
    ).astype(np.float64)


def pope_from_confusion(counts: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and yes-ratio from summed (or per-item) confusion rows."""
    tp, fp, tn, fn = np.asarray(counts, dtype=np.float64).reshape(-1, 4).sum(axis=0)
    total = tp + fp + tn + fn
    if total == 0:
        raise ValueError("no items to score")
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "accuracy": float((tp + tn) / total),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "yes_ratio": float((tp + fp) / total),
    }


def pope_metrics(predictions: Sequence[str], labels: Sequence[str | int]) -> dict[str, float]:
    """POPE accuracy, precision, recall, f1 and yes_ratio (share of "yes" predictions)."""
    return pope_from_confusion(pope_confusion(predictions, labels))
