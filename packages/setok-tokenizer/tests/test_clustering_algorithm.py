"""Algorithm 1 (semantic_clustering): hand-computed cases, the plain reference, gradients."""

import math

import pytest
import torch
from torch.testing import assert_close

from setok_tokenizer.clustering import density_peak_scores, semantic_clustering
from setok_tokenizer.clustering_reference import (
    _adaptive_betas,
    reference_density_peak_scores,
    reference_semantic_clustering,
)

LN2 = math.log(2.0)


def line(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)[None, :, None]


# x = 0, 1, 3 with beta = ln 2, so alpha = 2^-d2; score = 3, 1, 2.
# step 0: seed 0, alpha = [1, 1/2, 2^-9], mask = [1, 1/2, 2^-9], scope = [0, 1/2, 1 - 2^-9]
# step 1: score*scope = [0, 1/2, 2 - 2^-8] -> seed 2, alpha = [2^-9, 2^-4, 1],
#         mask = [0, 1/32, 1 - 2^-9], scope = [0, 15/32, 0]; rest = [0, 15/32, 0]
CASE1_X = line(0, 1, 3)
CASE1_SCORE = torch.tensor([[3.0, 1.0, 2.0]])
CASE1_SOFT = torch.tensor([[[1, 0.5, 2**-9], [0, 1 / 32, 1 - 2**-9], [0, 15 / 32, 0]]])


def test_case1_soft_fixed() -> None:
    out = semantic_clustering(CASE1_X, CASE1_SCORE, 3, kernel_scale=LN2, stop="fixed")
    assert_close(out.masks, CASE1_SOFT)
    assert out.seeds.tolist() == [[0, 2, -1]]
    assert out.num_clusters.tolist() == [3]
    assert out.cluster_valid.tolist() == [[True, True, True]]
    assert out.masks.dtype == torch.float32


def test_case1_hard_drops_empty_rest() -> None:
    # argmax per token: 0 -> c0 (1), 1 -> c0 (1/2 > 15/32 > 1/32), 2 -> c1; rest is empty.
    out = semantic_clustering(
        CASE1_X, CASE1_SCORE, 3, kernel_scale=LN2, stop="fixed", assignment="hard"
    )
    assert out.masks.tolist() == [[[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]]
    assert out.seeds.tolist() == [[0, 2, -1]]
    assert out.num_clusters.tolist() == [2]
    assert out.cluster_valid.tolist() == [[True, True, False]]


def test_case1_dynamic_stop_after_one_step() -> None:
    # min_scope 0.5 -> budget 1.5; after step 0 the scope sums to 1/2 + 1 - 2^-9 < 1.5: stop.
    out = semantic_clustering(CASE1_X, CASE1_SCORE, 3, kernel_scale=LN2, min_scope=0.5)
    expected = torch.tensor([[[1, 0.5, 2**-9], [0, 0.5, 1 - 2**-9], [0, 0, 0]]])
    assert_close(out.masks, expected)
    assert out.seeds.tolist() == [[0, -1, -1]]
    assert out.num_clusters.tolist() == [2]
    assert out.cluster_valid.tolist() == [[True, True, False]]


def test_batched_images_stop_independently() -> None:
    # image 1: x = 0, 10, 20 (padded to 4 tokens), score 1, 2, 3; far apart, so
    # step 0: seed 2, mask [0, 2^-100, 1]; scope [1, 1, 0] sums to 2 > 1.5 -> continues;
    # step 1: seed 1, mask [2^-100, 1, 0]; rest [1, 0, 0]. Image 0 (case 1) stops after step 0.
    x = torch.cat([torch.cat([CASE1_X, line(99)], 1), line(0, 10, 20, -5)], dim=0)
    score = torch.tensor([[3.0, 1.0, 2.0, 7.0], [1.0, 2.0, 3.0, 9.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, False]])
    out = semantic_clustering(x, score, 3, valid=valid, kernel_scale=LN2, min_scope=0.5)
    assert out.num_clusters.tolist() == [2, 3]
    assert out.seeds.tolist() == [[0, -1, -1], [2, 1, -1]]
    expected1 = torch.tensor([[0, 2**-100, 1, 0], [2**-100, 1, 0, 0], [1, 0, 0, 0]])
    assert_close(out.masks[1], expected1)
    alone = semantic_clustering(CASE1_X, CASE1_SCORE, 3, kernel_scale=LN2, min_scope=0.5)
    assert torch.equal(out.masks[0, :, :3], alone.masks[0])
    assert torch.equal(out.masks[:, :, 3], torch.zeros(2, 3))


def test_hard_compaction_and_lowest_index_tie() -> None:
    # x = 0, 1, 10, score 2, 1.5, 0.5, beta = ln 2, K = 4 fixed:
    # step 0: seed 0, mask [1, 1/2, ~0], scope [0, 1/2, 1]; step 1: seed 1 (0.75 > 0.5),
    # mask [0, 1/2, ~0], scope [0, 0, 1]; step 2: seed 2, mask [0, 0, 1]; rest = 0.
    # Token 1 ties 1/2 vs 1/2 -> cluster 0, so cluster 1 and the rest are empty and dropped.
    x, score = line(0, 1, 10), torch.tensor([[2.0, 1.5, 0.5]])
    soft = semantic_clustering(x, score, 4, kernel_scale=LN2, stop="fixed")
    assert soft.seeds.tolist() == [[0, 1, 2, -1]]
    assert_close(soft.masks[0, :3], torch.tensor([[1, 0.5, 0], [0, 0.5, 0], [0, 0, 1.0]]))
    hard = semantic_clustering(x, score, 4, kernel_scale=LN2, stop="fixed", assignment="hard")
    assert hard.masks.tolist() == [[[1, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]]]
    assert hard.seeds.tolist() == [[0, 2, -1, -1]]
    assert hard.num_clusters.tolist() == [2]
    assert hard.cluster_valid.tolist() == [[True, True, False, False]]


def test_fixed_stop_default_kernel_scale_is_k_ln2() -> None:
    x = torch.randn(2, 9, 3, generator=torch.Generator().manual_seed(0)) * 0.3
    score = density_peak_scores(x, 2)
    default = semantic_clustering(x, score, 5, stop="fixed")
    explicit = semantic_clustering(x, score, 5, stop="fixed", kernel_scale=5 * LN2)
    assert torch.equal(default.masks, explicit.masks)
    other = semantic_clustering(x, score, 5, stop="fixed", kernel_scale=1.0)
    assert not torch.equal(default.masks, other.masks)


def test_dynamic_default_is_adaptive_and_needs_the_scores() -> None:
    x = torch.randn(2, 9, 3, generator=torch.Generator().manual_seed(0)) * 0.3
    scores = density_peak_scores(x, 2)
    adaptive = semantic_clustering(x, scores, 5)
    old = semantic_clustering(x, scores, 5, kernel_scale=5 * LN2)
    assert not torch.equal(adaptive.masks, old.masks)
    with pytest.raises(ValueError, match="DensityPeakScores"):
        semantic_clustering(x, scores.score, 5)


def clustered_features(b: int, n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 4, d, generator=g)
    which = torch.randint(0, 4, (b, n), generator=g)
    x = centres.gather(1, which[..., None].expand(-1, -1, d))
    return torch.nn.functional.normalize(x + 0.3 * torch.randn(b, n, d, generator=g), dim=-1)


@pytest.mark.parametrize("assignment", ["soft", "hard"])
@pytest.mark.parametrize("stop", ["dynamic", "fixed"])
@pytest.mark.parametrize("knn_k", [1, 4])
def test_matches_plain_reference(assignment: str, stop: str, knn_k: int) -> None:
    x = clustered_features(3, 30, 8, seed=knn_k)
    valid = torch.rand(3, 30, generator=torch.Generator().manual_seed(5)) > 0.25
    s = density_peak_scores(x, knn_k, valid)
    r = reference_density_peak_scores(x, knn_k, valid)
    for name in ("rho", "delta", "score", "knn_d2"):
        assert_close(getattr(s, name), getattr(r, name), rtol=1e-4, atol=1e-5)
    kwargs = dict(valid=valid, assignment=assignment, stop=stop, min_scope=0.1)
    out = semantic_clustering(x, s, 8, **kwargs)
    ref = reference_semantic_clustering(x, r, 8, **kwargs)
    assert torch.equal(out.seeds, ref.seeds)
    assert torch.equal(out.num_clusters, ref.num_clusters)
    assert torch.equal(out.cluster_valid, ref.cluster_valid)
    assert_close(out.masks, ref.masks, rtol=1e-4, atol=1e-5)


def test_shared_d2_gives_identical_output() -> None:
    x = clustered_features(2, 25, 6, seed=3)
    valid = torch.ones(2, 25, dtype=torch.bool)
    valid[1, 20:] = False
    s = density_peak_scores(x, 3, valid, keep_d2=True)
    a = semantic_clustering(x, s, 6, valid=valid, d2=s.d2, assignment="hard")
    b = semantic_clustering(x, s, 6, valid=valid, assignment="hard")
    assert torch.equal(a.masks, b.masks) and torch.equal(a.seeds, b.seeds)


def autograd_masks(x: torch.Tensor, seeds: torch.Tensor, beta: float | list) -> torch.Tensor:
    """Algorithm 1 with the seeds (and per-token betas) given, with autograd in a plain loop."""
    scope = torch.ones(x.shape[0])
    masks = []
    for seed in seeds.tolist():
        if seed < 0:
            break
        b = beta[seed] if isinstance(beta, list) else beta
        alpha = torch.exp(-b * ((x - x[seed]) ** 2).sum(-1))
        masks.append(scope * alpha)
        scope = scope * (1 - alpha)
    return torch.stack(masks + [scope])


def test_gradient_matches_plain_autograd_loop() -> None:
    x = clustered_features(2, 12, 5, seed=7)
    score = density_peak_scores(x, 2).score
    weights = torch.randn(2, 6, 12, generator=torch.Generator().manual_seed(8))
    xg = x.clone().requires_grad_(True)
    out = semantic_clustering(xg, score, 6, kernel_scale=2.0)
    (out.masks * weights).sum().backward()
    for b in range(2):
        xb = x[b].clone().requires_grad_(True)
        m = autograd_masks(xb, out.seeds[b], 2.0)
        (m * weights[b, : m.shape[0]]).sum().backward()
        assert_close(xg.grad[b], xb.grad, rtol=1e-3, atol=1e-5)
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_adaptive_gradient_matches_plain_autograd_loop() -> None:
    x = clustered_features(2, 12, 5, seed=7)
    scores = density_peak_scores(x, 2)
    weights = torch.randn(2, 6, 12, generator=torch.Generator().manual_seed(8))
    xg = x.clone().requires_grad_(True)
    out = semantic_clustering(xg, scores, 6)
    (out.masks * weights).sum().backward()
    for b in range(2):
        betas = _adaptive_betas(x[b], scores.score[b], scores, b, list(range(12)), 5)
        xb = x[b].clone().requires_grad_(True)
        m = autograd_masks(xb, out.seeds[b], betas)
        (m * weights[b, : m.shape[0]]).sum().backward()
        assert_close(xg.grad[b], xb.grad, rtol=1e-3, atol=1e-5)
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_gradient_values_equal_no_grad_values() -> None:
    x = clustered_features(2, 20, 4, seed=9)
    score = density_peak_scores(x, 3)
    plain = semantic_clustering(x, score, 5)
    tracked = semantic_clustering(x.clone().requires_grad_(True), score, 5)
    assert tracked.masks.requires_grad
    assert torch.equal(plain.masks, tracked.masks.detach())


def test_hard_straight_through_is_one_hot_with_soft_gradient() -> None:
    x = clustered_features(1, 16, 4, seed=10).requires_grad_(True)
    score = density_peak_scores(x, 3)
    out = semantic_clustering(x, score, 4, assignment="hard")
    assert set(out.masks.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out.masks.detach().sum(1), torch.ones(1, 16))
    out.masks[:, 0].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    plain = semantic_clustering(x.detach(), score, 4, assignment="hard", straight_through=False)
    assert torch.equal(plain.masks, out.masks.detach())
    frozen = semantic_clustering(x, score, 4, assignment="hard", straight_through=False)
    assert not frozen.masks.requires_grad


def test_padding_gets_no_gradient_even_if_nan() -> None:
    x = clustered_features(1, 10, 4, seed=11)
    x[0, 8:] = float("nan")
    valid = torch.ones(1, 10, dtype=torch.bool)
    valid[0, 8:] = False
    xg = x.clone().requires_grad_(True)
    score = density_peak_scores(x, 2, valid)
    out = semantic_clustering(xg, score, 4, valid=valid)
    out.masks.sum(1).pow(2).sum().backward()
    assert torch.isfinite(xg.grad[0, :8]).all()
    assert torch.equal(xg.grad[0, 8:], torch.zeros(2, 4))
    assert torch.equal(out.masks[0, :, 8:].detach(), torch.zeros(4, 2))


def test_bf16_input_fp32_masks_and_gradient() -> None:
    x = clustered_features(2, 14, 6, seed=12).bfloat16().requires_grad_(True)
    s = density_peak_scores(x, 3)
    out = semantic_clustering(x, s, 5)
    ref = semantic_clustering(x.detach().float(), s, 5)
    assert out.masks.dtype == torch.float32
    assert torch.equal(out.masks.detach(), ref.masks)
    out.masks[:, 0].sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
