"""Turn a task's merged predictions into metric values, intervals and per-item states."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from setok_eval.codec import decode_labels
from setok_eval.documents import load_image, load_label_map
from setok_eval.metrics.cider import CiderD, tokenize_caption
from setok_eval.metrics.flops import prefill_flops
from setok_eval.metrics.grounding import normalized_to_pixels, rec_hits, xywh_to_xyxy
from setok_eval.metrics.image import (
    FeatureExtractor,
    feature_cosine,
    fid_from_features,
    l1_distance,
)
from setok_eval.metrics.mme import MMEItem, mme_from_states, mme_image_states
from setok_eval.metrics.pope import parse_pope_answer, pope_confusion
from setok_eval.metrics.segmentation import mask_intersection_union
from setok_eval.metrics.tokenizer import (
    adjusted_rand_index,
    hungarian_miou,
    mean_best_overlap,
    resize_labels,
    tokens_per_image_stats,
)
from setok_eval.metrics.vqa import exact_match, vqa_accuracy
from setok_eval.registry import MetricSpec, TaskSpec
from setok_eval.stats import bootstrap_ci, reduce_states

_POPE = {"pope_precision", "pope_recall", "pope_f1", "pope_yes_ratio"}


class Scored:
    """One metric's per-item states, reducer, value and optional custom resample statistic."""

    def __init__(
        self,
        ids: Sequence[str],
        states: np.ndarray | None,
        reducer: str | None,
        value: float | None = None,
        resample: Callable[[np.ndarray], float] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        self.ids = list(ids)
        self.states = (
            None if states is None else np.asarray(states, dtype=np.float64).reshape(len(ids), -1)
        )
        self.reducer = reducer
        self.value = value if value is not None else reduce_states(self.states, reducer)
        self.resample = resample
        self.details = dict(details or {})

    def interval(self, n_resamples: int, seed: int) -> list[float] | None:
        if n_resamples <= 0 or (self.states is None and self.resample is None):
            return None
        stat = self.resample or (lambda idx: reduce_states(self.states[idx], self.reducer))
        lo, hi = bootstrap_ci(stat, len(self.ids), n_resamples=n_resamples, seed=seed)
        return [lo, hi]


def _gt_box(doc: Mapping[str, Any]) -> np.ndarray:
    fmt = doc.get("box_format", "xyxy")
    box = np.asarray(doc["box"], dtype=np.float64)[None]
    if fmt == "xyxy":
        return box
    if fmt == "xywh":
        return xywh_to_xyxy(box)
    if fmt == "norm_xyxy":
        return normalized_to_pixels(
            box, float(doc["width"]), float(doc["height"]), float(doc.get("box_scale", 1.0))
        )
    raise ValueError(
        f"document {doc['id']!r}: box_format must be xyxy, xywh or norm_xyxy, got {fmt!r}"
    )


def _pred_box(pred: Any, doc_id: str) -> np.ndarray:
    arr = np.asarray(pred, dtype=np.float64).reshape(-1) if pred is not None else np.zeros(0)
    if arr.size != 4:
        return np.full((1, 4), np.nan)  # unparsable prediction: scores 0
    return arr[None]


def _count_tokens(labels: np.ndarray) -> int:
    return int(np.unique(labels[labels >= 0]).size)


def _extractor(
    spec: MetricSpec, task: TaskSpec, extractors: Mapping[str, FeatureExtractor]
) -> FeatureExtractor:
    name = spec.args.get("extractor")
    if name is None:
        raise ValueError(
            f"task {task.name!r} metric {spec.name!r} needs args.extractor (e.g. clip)"
        )
    if name not in extractors:
        raise KeyError(
            f"task {task.name!r} metric {spec.name!r} needs feature extractor {name!r}: pass "
            f"extractors={{{name!r}: callable}} to run_eval or --extractor {name}=PATH to run.py"
        )
    return extractors[name]


def _features(extractor: FeatureExtractor, images: list[np.ndarray], chunk: int = 32) -> np.ndarray:
    parts = [
        np.asarray(extractor(images[i : i + chunk]), dtype=np.float64)
        for i in range(0, len(images), chunk)
    ]
    return np.concatenate(parts, axis=0)


def score_task(
    task: TaskSpec,
    docs: Sequence[Mapping[str, Any]],
    preds: Mapping[str, Any],
    out_dir: str | Path,
    *,
    extractors: Mapping[str, FeatureExtractor] | None = None,
    llm_config: Mapping[str, Any] | None = None,
) -> dict[str, Scored]:
    """Score every metric of `task`; `preds[doc_id]` is the cached (serialised) prediction."""
    missing = [d["id"] for d in docs if d["id"] not in preds]
    if missing:
        raise ValueError(
            f"task {task.name!r}: {len(missing)} documents lack predictions, e.g. {missing[:5]}"
        )
    extractors = extractors or {}
    out_dir = Path(out_dir)
    ids = [d["id"] for d in docs]
    p = [preds[i] for i in ids]
    cache: dict[str, Any] = {}

    def images(kind: str) -> list[np.ndarray]:
        if kind not in cache:
            if kind == "pred":
                cache[kind] = [load_image(out_dir / v) for v in p]
            else:
                cache[kind] = [load_image(d["target"]) for d in docs]
        return cache[kind]

    def cluster_maps() -> list[np.ndarray]:
        if "clusters" not in cache:
            cache["clusters"] = [decode_labels(v) for v in p]
        return cache["clusters"]

    out: dict[str, Scored] = {}
    for spec in task.metrics:
        m = spec.metric
        if m == "vqa_accuracy":
            out[spec.name] = Scored(
                ids,
                [vqa_accuracy(str(a), d["answers"]) for a, d in zip(p, docs, strict=True)],
                "mean",
            )
        elif m == "exact_match":
            out[spec.name] = Scored(
                ids,
                [exact_match(str(a), d["answer"]) for a, d in zip(p, docs, strict=True)],
                "mean",
            )
        elif m == "cider_d":
            scorer = CiderD(
                [tokenize_caption(str(a)) for a in p],
                [[tokenize_caption(r) for r in d["references"]] for d in docs],
            )
            per_doc = scorer.per_doc()
            out[spec.name] = Scored(
                ids,
                per_doc,
                "mean",
                value=float(per_doc.mean()),
                resample=lambda idx, s=scorer: s.score(np.bincount(idx, minlength=s.num_docs)),
            )
        elif m == "pope_accuracy":
            correct = [
                float(
                    parse_pope_answer(str(a))
                    == (1 if str(d["label"]).lower() in ("yes", "1") else 0)
                )
                for a, d in zip(p, docs, strict=True)
            ]
            out[spec.name] = Scored(ids, correct, "mean")
        elif m in _POPE:
            out[spec.name] = Scored(
                ids, pope_confusion([str(a) for a in p], [d["label"] for d in docs]), m
            )
        elif m == "mme_score":
            items = [
                MMEItem(str(d["subtask"]), str(d["image_id"]), str(a), str(d["answer"]))
                for a, d in zip(p, docs, strict=True)
            ]
            subtasks, states = mme_image_states(items)
            keys = sorted({(it.subtask, it.image_id) for it in items})
            details = mme_from_states(states, subtasks)
            out[spec.name] = Scored(
                [f"{s}/{i}" for s, i in keys], states, "mme_total", details=details
            )
        elif m == "rec_accuracy":
            thr = float(spec.args.get("iou_threshold", 0.5))
            pred_boxes = np.concatenate([_pred_box(a, i) for a, i in zip(p, ids, strict=True)])
            gt_boxes = np.concatenate([_gt_box(d) for d in docs])
            out[spec.name] = Scored(ids, rec_hits(pred_boxes, gt_boxes, thr), "mean")
        elif m in ("giou", "ciou"):
            if "iu" not in cache:
                gts = [load_label_map(d["mask"]) > 0 for d in docs]
                cache["iu"] = mask_intersection_union([decode_labels(v) > 0 for v in p], gts)
            out[spec.name] = Scored(ids, cache["iu"], m)
        elif m == "l1":
            out[spec.name] = Scored(ids, l1_distance(images("pred"), images("target")), "mean")
        elif m == "feature_cosine":
            ex = _extractor(spec, task, extractors)
            cos = feature_cosine(_features(ex, images("pred")), _features(ex, images("target")))
            out[spec.name] = Scored(ids, cos, "mean")
        elif m == "fid":
            ex = _extractor(spec, task, extractors)
            value = fid_from_features(
                _features(ex, images("pred")), _features(ex, images("target"))
            )
            out[spec.name] = Scored(ids, None, None, value=value)
        elif m == "tokens_per_image":
            counts = [_count_tokens(c) for c in cluster_maps()]
            out[spec.name] = Scored(ids, counts, "mean", details=tokens_per_image_stats(counts))
        elif m in ("ari", "mbo", "hungarian_miou"):
            fn = {
                "ari": adjusted_rand_index,
                "mbo": mean_best_overlap,
                "hungarian_miou": hungarian_miou,
            }[m]
            ignore = spec.args.get("ignore_label")
            vals = []
            for c, d in zip(cluster_maps(), docs, strict=True):
                gt = load_label_map(d["masks"])
                vals.append(fn(resize_labels(c, gt.shape), gt, ignore_label=ignore))
            out[spec.name] = Scored(ids, vals, "mean")
        elif m == "prefill_flops":
            cfg = spec.args.get("llm") or llm_config
            if not cfg:
                raise ValueError(
                    f"task {task.name!r} metric {spec.name!r} needs an LLM config: args.llm in the "
                    f"task file or llm_config= in run_eval"
                )
            text = spec.args.get("text_tokens", 0)
            flops = [
                prefill_flops(cfg, int(d.get("text_tokens", text)) + _count_tokens(c))
                for c, d in zip(cluster_maps(), docs, strict=True)
            ]
            out[spec.name] = Scored(ids, flops, "mean")
        else:  # pragma: no cover - the registry rejects unknown metrics
            raise KeyError(f"no scorer for metric {m!r}")
    return out
