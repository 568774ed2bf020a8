"""Turn a task's merged predictions into metric values, intervals and per-item states."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from setok_eval.codec import decode_labels
from setok_eval.documents import load_image, load_label_map
from setok_eval.metrics.cider import CiderD, tokenize_caption
from setok_eval.metrics.colour import colour_match_states, dominant_colour
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


def _pred_box(pred: Any) -> np.ndarray:
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


class Inputs:
    """What a metric function reads: one task's documents and predictions, aligned by id,
    with images and cluster maps loaded once and shared between the task's metrics."""

    def __init__(
        self,
        task: TaskSpec,
        docs: Sequence[Mapping[str, Any]],
        preds: Mapping[str, Any],
        out_dir: Path,
        extractors: Mapping[str, FeatureExtractor],
        llm_config: Mapping[str, Any] | None,
    ) -> None:
        self.task, self.docs, self.out_dir = task, docs, out_dir
        self.extractors, self.llm_config = extractors, llm_config
        self.ids = [d["id"] for d in docs]
        self.preds = [preds[i] for i in self.ids]

    def pairs(self) -> Iterable[tuple[Any, Mapping[str, Any]]]:
        return zip(self.preds, self.docs, strict=True)

    @cached_property
    def pred_images(self) -> list[np.ndarray]:
        return [load_image(self.out_dir / v) for v in self.preds]

    @cached_property
    def target_images(self) -> list[np.ndarray]:
        return [load_image(d["target"]) for d in self.docs]

    @cached_property
    def cluster_maps(self) -> list[np.ndarray]:
        return [decode_labels(v) for v in self.preds]

    @cached_property
    def mask_iu(self) -> np.ndarray:
        """Per-document intersection and union of predicted and reference masks."""
        gts = [load_label_map(d["mask"]) > 0 for d in self.docs]
        return mask_intersection_union([decode_labels(v) > 0 for v in self.preds], gts)

    def features(self, spec: MetricSpec) -> tuple[np.ndarray, np.ndarray]:
        """(predicted, target) image features from the extractor `spec` names."""
        ex = _extractor(spec, self.task, self.extractors)
        return _features(ex, self.pred_images), _features(ex, self.target_images)


MetricFn = Callable[[MetricSpec, Inputs], Scored]


def _vqa_accuracy(spec: MetricSpec, x: Inputs) -> Scored:
    return Scored(x.ids, [vqa_accuracy(str(a), d["answers"]) for a, d in x.pairs()], "mean")


def _exact_match(spec: MetricSpec, x: Inputs) -> Scored:
    return Scored(x.ids, [exact_match(str(a), d["answer"]) for a, d in x.pairs()], "mean")


def _cider_d(spec: MetricSpec, x: Inputs) -> Scored:
    scorer = CiderD(
        [tokenize_caption(str(a)) for a in x.preds],
        [[tokenize_caption(r) for r in d["references"]] for d in x.docs],
    )
    per_doc = scorer.per_doc()
    return Scored(
        x.ids,
        per_doc,
        "mean",
        value=float(per_doc.mean()),
        resample=lambda idx: scorer.score(np.bincount(idx, minlength=scorer.num_docs)),
    )


def _pope_accuracy(spec: MetricSpec, x: Inputs) -> Scored:
    correct = [
        float(parse_pope_answer(str(a)) == (1 if str(d["label"]).lower() in ("yes", "1") else 0))
        for a, d in x.pairs()
    ]
    return Scored(x.ids, correct, "mean")


def _pope_confusion(spec: MetricSpec, x: Inputs) -> Scored:
    """Confusion rows per item; the reducer named after the metric computes the rate."""
    rows = pope_confusion([str(a) for a in x.preds], [d["label"] for d in x.docs])
    return Scored(x.ids, rows, spec.metric)


def _mme_score(spec: MetricSpec, x: Inputs) -> Scored:
    items = [
        MMEItem(str(d["subtask"]), str(d["image_id"]), str(a), str(d["answer"]))
        for a, d in x.pairs()
    ]
    subtasks, states = mme_image_states(items)
    keys = sorted({(it.subtask, it.image_id) for it in items})
    details = mme_from_states(states, subtasks)
    return Scored([f"{s}/{i}" for s, i in keys], states, "mme_total", details=details)


def _rec_accuracy(spec: MetricSpec, x: Inputs) -> Scored:
    thr = float(spec.args.get("iou_threshold", 0.5))
    pred_boxes = np.concatenate([_pred_box(a) for a in x.preds])
    gt_boxes = np.concatenate([_gt_box(d) for d in x.docs])
    return Scored(x.ids, rec_hits(pred_boxes, gt_boxes, thr), "mean")


def _mask_iou(spec: MetricSpec, x: Inputs) -> Scored:
    """gIoU or cIoU: the same intersection/union states, reduced as the metric's name says."""
    return Scored(x.ids, x.mask_iu, spec.metric)


def _l1(spec: MetricSpec, x: Inputs) -> Scored:
    return Scored(x.ids, l1_distance(x.pred_images, x.target_images), "mean")


def _feature_cosine(spec: MetricSpec, x: Inputs) -> Scored:
    return Scored(x.ids, feature_cosine(*x.features(spec)), "mean")


def _fid(spec: MetricSpec, x: Inputs) -> Scored:
    value = fid_from_features(*x.features(spec))
    return Scored(x.ids, None, None, value=value)


def _colour_match(spec: MetricSpec, x: Inputs) -> Scored:
    """The generated image's dominant palette colour is one its prompt names; the details
    hold the same images' rate against the other documents' prompts (the control)."""
    colours, background = spec.args.get("colours") or {}, spec.args.get("background") or {}
    dominant = [dominant_colour(im, colours, background) for im in x.pred_images]
    states, other = colour_match_states(dominant, [d["caption"] for d in x.docs], list(colours))
    drawn = [d for d in dominant if d is not None]
    return Scored(
        x.ids, states, "mean",
        details={"other_prompts": other, "nothing_drawn": len(dominant) - len(drawn),
                 "dominant": {c: drawn.count(c) for c in sorted(set(drawn))}},
    )  # fmt: skip


def _tokens_per_image(spec: MetricSpec, x: Inputs) -> Scored:
    counts = [_count_tokens(c) for c in x.cluster_maps]
    return Scored(x.ids, counts, "mean", details=tokens_per_image_stats(counts))


def _partition(fn: Callable[..., float]) -> MetricFn:
    """A cluster-map-vs-object-masks score (ARI, mBO, Hungarian mIoU) per document."""

    def score(spec: MetricSpec, x: Inputs) -> Scored:
        ignore = spec.args.get("ignore_label")
        vals = []
        for c, d in zip(x.cluster_maps, x.docs, strict=True):
            gt = load_label_map(d["masks"])
            vals.append(fn(resize_labels(c, gt.shape), gt, ignore_label=ignore))
        return Scored(x.ids, vals, "mean")

    return score


def _prefill_flops(spec: MetricSpec, x: Inputs) -> Scored:
    cfg = spec.args.get("llm") or x.llm_config
    if not cfg:
        raise ValueError(
            f"task {x.task.name!r} metric {spec.name!r} needs an LLM config: args.llm in the "
            f"task file or llm_config= in run_eval"
        )
    text = spec.args.get("text_tokens", 0)
    flops = [
        prefill_flops(cfg, int(d.get("text_tokens", text)) + _count_tokens(c))
        for c, d in zip(x.cluster_maps, x.docs, strict=True)
    ]
    return Scored(x.ids, flops, "mean")


# One function per metric of the registry's catalogue (`registry.METRICS`); a test checks
# that the two name the same metrics and that the suite's tasks use every one.
SCORERS: dict[str, MetricFn] = {
    "vqa_accuracy": _vqa_accuracy,
    "exact_match": _exact_match,
    "cider_d": _cider_d,
    "pope_accuracy": _pope_accuracy,
    "pope_precision": _pope_confusion,
    "pope_recall": _pope_confusion,
    "pope_f1": _pope_confusion,
    "pope_yes_ratio": _pope_confusion,
    "mme_score": _mme_score,
    "rec_accuracy": _rec_accuracy,
    "giou": _mask_iou,
    "ciou": _mask_iou,
    "l1": _l1,
    "feature_cosine": _feature_cosine,
    "fid": _fid,
    "colour_match": _colour_match,
    "tokens_per_image": _tokens_per_image,
    "ari": _partition(adjusted_rand_index),
    "mbo": _partition(mean_best_overlap),
    "hungarian_miou": _partition(hungarian_miou),
    "prefill_flops": _prefill_flops,
}


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
    x = Inputs(task, docs, preds, Path(out_dir), extractors or {}, llm_config)
    return {spec.name: SCORERS[spec.metric](spec, x) for spec in task.metrics}
