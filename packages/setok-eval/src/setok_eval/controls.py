"""Controls that say whether a model reads its images, on exactly the evaluated documents.

* Blind baseline: the train split's majority answer per question type, scored with the
  task's own metric on the documents the model was scored on (what a question-only model
  gets; a model at this level has learnt the answer prior, not the picture).
* Shifted images: the same documents, each paired with ANOTHER evaluated scene's image
  (a seeded derangement of the distinct images). Ground truth stays the document's own,
  so a model that reads the image loses; one that ignores it scores exactly the same.
* Grouped scores: any per-document score by a document field (question type), each with
  a 95% bootstrap interval over documents (`setok_eval.stats.bootstrap_ci`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from setok_eval.adapters import Request
from setok_eval.io import stable_hash
from setok_eval.metrics.vqa import vqa_accuracy
from setok_eval.stats import bootstrap_ci

ADAPTER_METHODS = ("understand", "ground", "segment", "generate", "edit", "tokenize")
ALL = "all"


# ---------------------------------------------------------------- blind baseline
def majority_answers(answer_counts: Mapping[str, Mapping[str, int]]) -> dict[str, str]:
    """The most frequent train answer of each question type (ties: alphabetically first, so
    the baseline does not depend on dict order)."""
    out = {}
    for qtype, counts in answer_counts.items():
        if not counts:
            raise ValueError(f"question type {qtype!r} has no train answers")
        out[qtype] = min(counts.items(), key=lambda kv: (-int(kv[1]), str(kv[0])))[0]
    return out


def blind_scores(
    docs: Sequence[Mapping[str, Any]],
    majority: Mapping[str, str],
    *,
    field: str = "question_type",
    metric: Callable[[str, Sequence[str]], float] = vqa_accuracy,
    answers_field: str = "answers",
) -> dict[str, float]:
    """Per-document score (by id) of answering each document with its type's majority answer.

    A document whose type has no train majority is an error naming it: a blind model has
    no answer for it, and scoring it 0 would quietly lower the baseline."""
    out: dict[str, float] = {}
    for doc in docs:
        doc_id = str(doc.get("id"))
        for key in (field, answers_field):
            if key not in doc:
                raise KeyError(f"document {doc_id!r} lacks field {key!r}")
        qtype = str(doc[field])
        if qtype not in majority:
            raise KeyError(
                f"document {doc_id!r}: {field} {qtype!r} has no train majority answer "
                f"(known: {sorted(majority)})"
            )
        out[doc_id] = float(metric(majority[qtype], doc[answers_field]))
    return out


# ---------------------------------------------------------------- grouped scores
def grouped_scores(
    scores: Mapping[str, float],
    docs: Sequence[Mapping[str, Any]],
    *,
    field: str = "question_type",
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Mean, n and 95% bootstrap interval of per-document scores, overall (`"all"`) and per
    value of `field`. Every document must have a score (a missing one is an error)."""
    if not docs:
        raise ValueError("no documents to summarise")
    groups: dict[str, list[float]] = {ALL: []}
    for doc in docs:
        doc_id = str(doc.get("id"))
        if doc_id not in scores:
            raise KeyError(f"no score for document {doc_id!r}")
        if field not in doc:
            raise KeyError(f"document {doc_id!r} lacks field {field!r}")
        value = float(scores[doc_id])
        groups[ALL].append(value)
        groups.setdefault(str(doc[field]), []).append(value)
    out = {}
    for name, values in groups.items():
        arr = np.asarray(values, dtype=np.float64)
        ci = (
            bootstrap_ci(
                lambda idx, a=arr: float(a[idx].mean()),
                len(arr),
                n_resamples=n_resamples,
                seed=seed,
            )
            if n_resamples > 0
            else None
        )
        out[name] = {
            "value": float(arr.mean()),
            "n": len(arr),
            "ci95": None if ci is None else list(ci),
        }
    return out


# ---------------------------------------------------------------- shifted images
def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A seeded uniform random permutation of range(n) with no fixed point (perm[i] != i)."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    rng = np.random.default_rng(seed)
    idx = np.arange(n)
    while True:  # rejection: about e tries on average
        perm = rng.permutation(n)
        if not (perm == idx).any():
            return perm


def shifted_image_map(images: Sequence[str], seed: int = 0) -> dict[str, str]:
    """Each distinct image path -> another one of them (a derangement of the sorted set)."""
    distinct = sorted({str(p) for p in images})
    if len(distinct) < 2:
        raise ValueError(
            f"the shifted-image control needs at least 2 distinct images, got {len(distinct)}"
        )
    perm = derangement(len(distinct), seed)
    return {src: distinct[int(j)] for src, j in zip(distinct, perm, strict=True)}


class ShiftedImageAdapter:
    """Wraps an adapter so every request sees another scene's image (`mapping[doc image]`);
    prompts and ground truth are unchanged. Its fingerprint differs from the wrapped one, so
    `run_eval` never mixes its predictions with the model's own."""

    def __init__(self, adapter: Any, mapping: Mapping[str, str]) -> None:
        same = [k for k, v in mapping.items() if k == v]
        if same:
            raise ValueError(f"shifted-image map sends images to themselves: {same[:3]}")
        self.adapter = adapter
        self.mapping = dict(mapping)
        self._fingerprint = (
            f"{adapter.fingerprint()}|shifted:{stable_hash(sorted(self.mapping.items()))}"
        )

    def fingerprint(self) -> str:
        return self._fingerprint

    def shift(self, request: Request) -> Request:
        """The request with its document's image replaced by its mapped partner."""
        path = request.image_path
        if path is None:
            raise ValueError(
                f"task {request.task!r} document {request.doc_id!r} has no image to shift"
            )
        if path not in self.mapping:
            raise KeyError(
                f"task {request.task!r} document {request.doc_id!r}: image {path} is not in "
                "the shifted-image map (build it from the evaluated documents)"
            )
        doc = {**request.doc, "image": self.mapping[path], "shifted_from": path}
        return Request(request.task, request.doc_id, request.prompt, doc, request.generation)

    def __getattr__(self, name: str) -> Any:
        if name not in ADAPTER_METHODS:
            raise AttributeError(name)
        inner = getattr(self.adapter, name)  # AttributeError when the model lacks it

        def call(requests: Sequence[Request]) -> list[Any]:
            return list(inner([self.shift(r) for r in requests]))

        return call
