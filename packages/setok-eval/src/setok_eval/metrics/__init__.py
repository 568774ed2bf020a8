"""Metric families; each module matches its benchmark's official definition."""

from setok_eval.metrics.cider import CiderD, cider_d, tokenize_caption
from setok_eval.metrics.flops import prefill_flops, prefill_flops_per_sample
from setok_eval.metrics.grounding import box_iou, normalized_to_pixels, rec_accuracy, xywh_to_xyxy
from setok_eval.metrics.image import (
    ProjectionExtractor,
    feature_cosine,
    fid_from_features,
    frechet_distance,
    l1_distance,
    load_feature_extractor,
)
from setok_eval.metrics.mme import MMEItem, mme_scores, parse_mme_answer
from setok_eval.metrics.pope import parse_pope_answer, pope_metrics
from setok_eval.metrics.segmentation import giou_ciou
from setok_eval.metrics.tokenizer import (
    adjusted_rand_index,
    hungarian_miou,
    mean_best_overlap,
    tokens_per_image_stats,
)
from setok_eval.metrics.vqa import exact_match, normalize_vqa_answer, vqa_accuracy

__all__ = [
    "CiderD",
    "MMEItem",
    "ProjectionExtractor",
    "adjusted_rand_index",
    "box_iou",
    "cider_d",
    "exact_match",
    "feature_cosine",
    "fid_from_features",
    "frechet_distance",
    "giou_ciou",
    "hungarian_miou",
    "l1_distance",
    "load_feature_extractor",
    "mean_best_overlap",
    "mme_scores",
    "normalize_vqa_answer",
    "normalized_to_pixels",
    "parse_mme_answer",
    "parse_pope_answer",
    "pope_metrics",
    "prefill_flops",
    "prefill_flops_per_sample",
    "rec_accuracy",
    "tokenize_caption",
    "tokens_per_image_stats",
    "vqa_accuracy",
    "xywh_to_xyxy",
]
