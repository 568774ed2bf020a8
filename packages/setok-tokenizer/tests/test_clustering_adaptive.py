"""The adaptive default: the number of clusters follows the planted content."""

from __future__ import annotations

import math

import pytest
import torch

from setok_tokenizer.clustering import (
    density_peak_centres,
    density_peak_scores,
    seed_bandwidths,
    semantic_clustering,
)
from setok_tokenizer.mechanisms import cluster_features
from setok_tokenizer.planted import planted_scene, swallowed_groups


def scenes(groups: list[int], seed: int, **kwargs) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [planted_scene(m, tokens=256, generator=gen, **kwargs) for m in groups]


@pytest.mark.parametrize("tightness", [(0.75, 0.8), (0.85, 0.9)])
def test_count_follows_planted_groups(tightness: tuple[float, float]) -> None:
    planted = scenes([1, 2, 4, 7, 10], seed=0, tightness=tightness)
    x = torch.stack([s.features for s in planted])
    out = cluster_features(x, "dynamic", max_clusters=16)
    counts = out.num_clusters.tolist()
    truth = [s.groups for s in planted]
    assert all(abs(c - t) <= 1 for c, t in zip(counts, truth, strict=True)), (counts, truth)
    for b, s in enumerate(planted):
        owner = out.masks[b, : counts[b]].argmax(0)
        assert swallowed_groups(s.labels, owner) <= 1


def test_old_fixed_kernel_does_not_follow_the_groups() -> None:
    """The failure the adaptive default fixes: beta = K ln 2 returns the cap for every m."""
    planted = scenes([1, 4, 10], seed=1)
    x = torch.stack([s.features for s in planted])
    out = cluster_features(x, "dynamic", max_clusters=16, kernel_scale=16 * math.log(2.0))
    assert out.num_clusters.tolist() == [16, 16, 16]


def test_explicit_kernel_scale_reproduces_the_previous_masks() -> None:
    """kernel_scale=K ln 2 is the previous default, step for step (plain loop of that time)."""
    x = planted_scene(5, tokens=64, dim=16, generator=torch.Generator().manual_seed(2)).features
    scores = density_peak_scores(x[None], 5)
    out = semantic_clustering(x[None], scores, 6, kernel_scale=6 * math.log(2.0), min_scope=0.05)
    beta = 6 * math.log(2.0)
    scope = torch.ones(64)
    s = scores.score[0]
    for step in range(5):
        if float(scope.sum()) <= 0.05 * 64:
            break
        seed = int((s * scope).argmax())
        assert int(out.seeds[0, step]) == seed
        alpha = torch.exp2(((x - x[seed]) ** 2).sum(-1) * (-beta / math.log(2.0)))
        torch.testing.assert_close(out.masks[0, step], scope * alpha, rtol=1e-4, atol=1e-6)
        scope = scope * (1 - alpha)


def test_batched_equals_per_image_with_padding() -> None:
    planted = scenes([3, 6, 1], seed=3)
    n = [256, 200, 150]
    x = torch.stack([s.features for s in planted])
    valid = torch.arange(256)[None, :] < torch.tensor(n)[:, None]
    x = torch.where(valid[:, :, None], x, 7.0)  # padding holds junk
    batched = cluster_features(x, "dynamic", max_clusters=12, valid=valid)
    for b in range(3):
        alone = cluster_features(x[b : b + 1, : n[b]], "dynamic", max_clusters=12)
        k = int(alone.num_clusters[0])
        assert int(batched.num_clusters[b]) == k
        assert torch.equal(batched.masks[b, :k, : n[b]], alone.masks[0, :k])
        assert torch.equal(batched.seeds[b, :k], alone.seeds[0, :k])


def test_centres_are_scale_free() -> None:
    """Scaling the features changes no distance ratio: the same tokens are centres."""
    x = torch.stack([s.features for s in scenes([5, 9], seed=4)])
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    found = []
    for scale in (1.0, 1.5):
        scores = density_peak_scores(x * scale, 5, keep_d2=True)
        found.append(density_peak_centres(scores, scores.d2, valid, max_seeds=20))
    assert torch.equal(found[0], found[1]) and found[0].sum(1).tolist() == [5, 9]


def test_centres_and_bandwidths_on_a_hand_case() -> None:
    # two tight pairs far apart: one centre per pair, each kernel at 1/3 of their distance
    x = torch.tensor([[[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.2, 0.0]]])
    scores = density_peak_scores(x, 1, keep_d2=True)
    valid = torch.ones(1, 4, dtype=torch.bool)
    centres = density_peak_centres(scores, scores.d2, valid, max_seeds=3)
    assert centres.sum() == 2 and bool(centres[0, :2].any()) and bool(centres[0, 2:].any())
    h = seed_bandwidths(scores.d2, centres, valid)
    between = float(scores.d2[0][centres[0]][:, centres[0]].max())
    assert torch.allclose(h[centres], torch.full((2,), between / 3.0))


def test_single_peak_is_one_cluster() -> None:
    x = planted_scene(1, tokens=128, generator=torch.Generator().manual_seed(5)).features
    out = cluster_features(x[None], "dynamic", max_clusters=8)
    assert out.num_clusters.tolist() == [1]
    const = cluster_features(torch.ones(1, 10, 4), "dynamic", max_clusters=8)
    assert const.num_clusters.tolist() == [1] and torch.isfinite(const.masks).all()
