"""Grounding, segmentation, image, tokenizer and FLOP metrics on hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from setok_eval.metrics.colour import colour_match_states, dominant_colour, named_colours
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
from setok_eval.metrics.segmentation import giou_ciou
from setok_eval.metrics.tokenizer import (
    adjusted_rand_index,
    hungarian_miou,
    mean_best_overlap,
    tokens_per_image_stats,
)


def test_box_iou_and_rec_accuracy_hand_worked():
    gt = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], dtype=float)
    pred = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 10, 5], [5, 5, 5, 9]], dtype=float)
    iou = box_iou(pred, gt)
    assert iou.tolist() == pytest.approx([1.0, 50 / 150, 0.5, 0.0])  # last one is degenerate
    assert rec_accuracy(pred, gt) == pytest.approx(0.5)  # IoU 0.5 counts (>=)
    assert rec_accuracy([[np.nan, 0, 1, 1]], [[0, 0, 1, 1]]) == 0.0
    with pytest.raises(ValueError, match="gt_boxes"):
        box_iou([[0, 0, 1, 1]], [[0, 0, 0, 1]])


def test_box_conversions():
    assert xywh_to_xyxy([[2, 3, 4, 5]]).tolist() == [[2, 3, 6, 8]]
    assert normalized_to_pixels([[0.1, 0.2, 0.5, 1.0]], 200, 100).tolist() == [[20, 20, 100, 100]]
    assert normalized_to_pixels([[100, 200, 500, 1000]], 200, 100, scale=1000).tolist() == [
        [20, 20, 100, 100]
    ]


def test_giou_ciou_as_lisa_defines():
    a = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 px
    b = np.zeros((4, 4), bool)
    b[:2, :] = True  # 8 px
    empty = np.zeros((4, 4), bool)
    # item 1: I=4 U=8 (0.5); item 2: I=8 U=8 (1.0); item 3: both empty (1.0, adds nothing to cIoU)
    giou, ciou = giou_ciou([a, b, empty], [b, b, empty])
    assert giou == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    assert ciou == pytest.approx(12 / 16)
    with pytest.raises(ValueError, match=r"pred_masks\[0\]"):
        giou_ciou([np.zeros((2, 2))], [np.zeros((3, 3))])


def test_frechet_distance_matches_closed_form_and_scipy():
    rng = np.random.default_rng(0)
    # Commuting (diagonal) covariances: FID = |mu1-mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected)
    # General SPD covariances: against a direct evaluation with scipy.linalg.sqrtm.
    a, b = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))
    c1, c2 = a @ a.T + np.eye(4), b @ b.T + np.eye(4)
    m1, m2 = rng.standard_normal(4), rng.standard_normal(4)
    direct = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(direct, rel=1e-9)
    assert frechet_distance(m1, c1, m1, c1) == pytest.approx(0.0, abs=1e-8)


def test_fid_from_samples_of_known_gaussians():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20000, 2))
    y = rng.standard_normal((20000, 2)) * 2.0 + np.array([3.0, 0.0])
    # Expected: 9 + 2 * (1 - 2)^2 = 11
    assert fid_from_features(x, y) == pytest.approx(11.0, rel=0.05)


def test_l1_cosine_and_projection_extractor(tmp_path):
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 51, np.uint8)
    assert l1_distance([a, b], [b, b]).tolist() == pytest.approx([0.2, 0.0])
    assert l1_distance([np.zeros((8, 8, 3), np.uint8)], [b]).tolist() == pytest.approx([0.2])
    cos = feature_cosine(np.array([[1.0, 0], [1, 1]]), np.array([[2.0, 0], [-1, -1]]))
    assert cos.tolist() == pytest.approx([1.0, -1.0])
    ex = ProjectionExtractor.random(size=4, dim=5, seed=3)
    ex.save(tmp_path / "proj.npz")
    loaded = load_feature_extractor(tmp_path / "proj.npz", kind="clip")
    feats = loaded([a, b])
    assert feats.shape == (2, 5)
    assert np.allclose(feats, ex([a, b]))


def test_missing_feature_extractor_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="inception.*'path'"):
        load_feature_extractor(tmp_path / "nope.pt", kind="inception")
    with pytest.raises(FileNotFoundError, match="path"):
        load_feature_extractor(None)


def test_adjusted_rand_index_hand_worked():
    gt = np.array([[0, 0, 1, 1, 1, 1]])
    assert adjusted_rand_index(gt, gt) == 1.0
    assert (
        adjusted_rand_index(np.array([[5, 5, 7, 7, 7, 7]]), gt) == 1.0
    )  # label names don't matter
    # pred {0,1,2},{3,4,5} vs gt {0,1},{2,3,4,5}: index=4, sum_a=7, sum_b=6, n pairs=15
    pred = np.array([[0, 0, 0, 1, 1, 1]])
    expected = (4 - 7 * 6 / 15) / ((7 + 6) / 2 - 7 * 6 / 15)
    assert adjusted_rand_index(pred, gt) == pytest.approx(expected)
    # ignore_label drops background pixels (FG-ARI): the foreground is one object, one cluster
    assert adjusted_rand_index(np.array([[3, 4, 9, 9, 9, 9]]), gt, ignore_label=0) == 1.0


def test_mbo_and_hungarian_miou_hand_worked():
    gt = np.array([[1, 1, 2, 2]])
    pred = np.array([[0, 0, 0, 0]])  # one cluster covers both objects
    assert mean_best_overlap(pred, gt) == pytest.approx(0.5)
    assert hungarian_miou(pred, gt) == pytest.approx(0.25)  # one object matched (IoU .5), one not
    pred2 = np.array([[0, 1, 2, 2]])
    assert mean_best_overlap(pred2, gt) == pytest.approx((0.5 + 1.0) / 2)
    assert hungarian_miou(pred2, gt) == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ValueError, match="shape"):
        mean_best_overlap(np.zeros((2, 2)), np.zeros((3, 3)))


def test_tokens_per_image_stats():
    s = tokens_per_image_stats([3, 5, 5, 7])
    assert s["mean"] == 5.0 and s["std"] == pytest.approx(np.sqrt(2.0))
    assert sum(s["hist_counts"]) == 4 and s["hist_counts"][2] == 2
    with pytest.raises(ValueError, match="counts"):
        tokens_per_image_stats([])


def test_prefill_flops_hand_counted():
    cfg = {"hidden": 8, "layers": 2, "intermediate": 16, "heads": 2, "vocab": 10}
    L = 5
    per_layer = 2 * L * 8 * (8 + 16) + 2 * L * 8 * 8 + 4 * L * L * 8 + 2 * L * 8 * 16 * 3
    assert prefill_flops(cfg, L) == 2 * per_layer + 2 * 8 * 10
    hf = {
        "hidden_size": 8,
        "num_hidden_layers": 2,
        "intermediate_size": 16,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 10,
    }
    gqa_layer = per_layer - 2 * L * 8 * 8  # k and v widths halve
    assert prefill_flops(hf, L) == 2 * gqa_layer + 160
    per_sample = prefill_flops_per_sample(cfg, 3, [2, 4])
    assert per_sample == [prefill_flops(cfg, 5), prefill_flops(cfg, 7)]
    with pytest.raises(KeyError, match="vocab"):
        prefill_flops({"hidden": 8, "layers": 1, "intermediate": 4, "heads": 2}, 3)


# ---------------------------------------------------------------- named-colour match
COLOURS = {"red": [220, 40, 40], "blue": [40, 80, 220], "green": [40, 170, 60]}
BACKGROUND = {"gray": [128, 128, 128], "white": [235, 235, 230]}


def _scene(background: list[int], *objects: tuple[list[int], int]) -> np.ndarray:
    """A 32x32 uint8 image: the background, then each object as a square of side `size`."""
    img = np.empty((32, 32, 3), np.uint8)
    img[:] = background
    for k, (rgb, size) in enumerate(objects):
        img[k : k + size, k : k + size] = rgb
    return img


def test_dominant_colour_is_the_largest_object_not_the_background() -> None:
    img = _scene([128, 128, 128], ([40, 80, 220], 14), ([220, 40, 40], 6))
    # shaded a little: the nearest palette colour still names it
    noisy = np.clip(img + np.random.default_rng(0).integers(-20, 20, img.shape), 0, 255)
    assert dominant_colour(noisy.astype(np.uint8), COLOURS, BACKGROUND) == "blue"
    assert dominant_colour(_scene([235, 235, 230]), COLOURS, BACKGROUND) is None  # nothing drawn
    with pytest.raises(ValueError, match="colours"):
        dominant_colour(img, {"red": [300, 0, 0]}, BACKGROUND)


def test_colour_match_counts_own_prompts_and_the_other_prompts_control() -> None:
    assert named_colours("A Red circle and a blue-ish square; reddish", COLOURS) == {"red", "blue"}
    prompts = ["a red square", "a blue circle", "a green star and a red dot"]
    # an image that follows its prompt, one that ignores it, one with nothing drawn
    states, other = colour_match_states(["red", "red", None], prompts, list(COLOURS))
    assert states.tolist() == [1.0, 0.0, 0.0]
    # red against the others' prompts: image 0 hits prompt 2, image 1 hits prompts 0 and 2
    assert other == pytest.approx(3 / 6)
    # a generator that draws every prompt's own colour beats the control
    follow, control = colour_match_states(["red", "blue", "green"], prompts, list(COLOURS))
    assert follow.mean() == 1.0 > control
