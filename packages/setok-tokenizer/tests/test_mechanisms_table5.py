"""The Table 5 mechanisms: threshold (DPC-KNN), fixed, resampler, patch, and the dispatcher."""

import torch
from torch.testing import assert_close

from setok_tokenizer.clustering import density_peak_scores, semantic_clustering
from setok_tokenizer.mechanisms import (
    Resampler,
    cluster_features,
    patch_clustering,
    threshold_clustering,
)


def line(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)[None, :, None]


def test_threshold_hand_case() -> None:
    # x = 0, 1, 5, 6, 20; score 10, 2, 6, 1, 4; max score 10, threshold 0.35 -> >= 3.5:
    # tokens 0 (10), 2 (6), 4 (4) are centres in that order; nearest centre:
    # 1 -> 0 (d2 1 vs 16), 3 -> 2 (d2 1 vs 36 vs 196).
    x, score = line(0, 1, 5, 6, 20), torch.tensor([[10.0, 2.0, 6.0, 1.0, 4.0]])
    out = threshold_clustering(x, score, threshold=0.35, min_clusters=1, max_clusters=5)
    assert out.num_clusters.tolist() == [3]
    assert out.seeds.tolist() == [[0, 2, 4, -1, -1]]
    assert out.cluster_valid.tolist() == [[True, True, True, False, False]]
    expected = [[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1], [0] * 5, [0] * 5]
    assert out.masks[0].tolist() == expected
    # max_clusters caps the centres (highest scores first); min_clusters raises the count
    capped = threshold_clustering(x, score, threshold=0.35, min_clusters=1, max_clusters=2)
    assert capped.seeds.tolist() == [[0, 2]]
    assert capped.masks[0].tolist() == [[1, 1, 0, 0, 0], [0, 0, 1, 1, 1]]
    raised = threshold_clustering(x, score, threshold=0.9, min_clusters=2, max_clusters=5)
    assert raised.num_clusters.tolist() == [2] and raised.seeds[0, :2].tolist() == [0, 2]


def test_threshold_is_nearest_centre_with_padding() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 5, generator=g)
    valid = torch.rand(3, 20, generator=g) > 0.3
    valid[:, 0] = True
    score = density_peak_scores(x, 3, valid).score
    out = threshold_clustering(x, score, threshold=0.2, min_clusters=2, max_clusters=6, valid=valid)
    for b in range(3):
        k = int(out.num_clusters[b])
        centres = out.seeds[b, :k]
        assert (centres >= 0).all() and valid[b, centres].all()
        assert (score[b, centres].diff() <= 0).all()  # descending score order
        d2 = torch.cdist(x[b], x[b, centres]) ** 2  # (N, k)
        owner = out.masks[b, :k].argmax(0)
        for i in valid[b].nonzero().flatten().tolist():
            assert d2[i, owner[i]] <= d2[i].min() + 1e-4
        assert torch.equal(out.masks[b].sum(0), valid[b].float())


def test_threshold_masks_carry_a_gradient() -> None:
    # The official DPC-KNN's hard masks have none: an objective on the masks could not train
    # the encoder. Hard forward values stay the official ones; the gradient is the soft one's.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 4, generator=g)
    valid = torch.rand(2, 16, generator=g) > 0.2
    valid[:, 0] = True
    score = density_peak_scores(x, 3, valid).score
    kw = dict(threshold=0.3, min_clusters=2, max_clusters=5, valid=valid)
    plain = threshold_clustering(x, score, **kw)
    xg = x.clone().requires_grad_(True)
    hard = threshold_clustering(xg, score, **kw)
    assert torch.equal(hard.masks.detach(), plain.masks)
    target = torch.rand(hard.masks.shape, generator=g)
    (hard.masks * target).sum().backward()
    assert xg.grad is not None and xg.grad[valid].abs().sum() > 0
    soft = threshold_clustering(x, score, assignment="soft", **kw).masks
    assert_close(soft.sum(1), valid.float())  # a distribution over the centres per token
    assert torch.equal(soft.argmax(1)[valid], plain.masks.argmax(1)[valid])  # own centre wins
    frozen = threshold_clustering(xg, score, straight_through=False, **kw)
    assert not frozen.masks.requires_grad


def test_fixed_gives_exactly_max_clusters() -> None:
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(2, 3, 4, generator=g) * 3  # three tight groups of ten tokens
    x = centres.repeat_interleave(10, dim=1) + 0.05 * torch.randn(2, 30, 4, generator=g)
    dyn = cluster_features(x, "dynamic", max_clusters=10, assignment="soft", min_scope=0.5)
    fixed = cluster_features(x, "fixed", max_clusters=10, assignment="soft", min_scope=0.5)
    assert (fixed.num_clusters == 10).all() and fixed.cluster_valid.all()
    assert (dyn.num_clusters < 10).all()


def test_dispatcher_equals_direct_calls() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 4, generator=g)
    valid = torch.rand(2, 16, generator=g) > 0.2
    valid[:, 0] = True
    s = density_peak_scores(x, 3, valid)
    for mech in ("dynamic", "fixed"):
        got = cluster_features(x, mech, max_clusters=5, knn_k=3, valid=valid, assignment="hard")
        want = semantic_clustering(x, s, 5, valid=valid, stop=mech, assignment="hard")
        assert torch.equal(got.masks, want.masks) and torch.equal(got.seeds, want.seeds)
        assert torch.equal(got.scores.score, s.score) and got.scores.d2 is None
    got = cluster_features(x, "threshold", max_clusters=5, knn_k=3, threshold=0.3, valid=valid)
    want = threshold_clustering(
        x, s.score, threshold=0.3, min_clusters=2, max_clusters=5, valid=valid
    )
    assert torch.equal(got.masks, want.masks) and torch.equal(got.seeds, want.seeds)
    patch = cluster_features(x, "patch", valid=valid)
    assert torch.equal(patch.masks, patch_clustering(valid).masks) and patch.scores is None


def test_patch_is_identity_compacted() -> None:
    valid = torch.tensor([[True, False, True, True], [True, True, True, True]])
    out = patch_clustering(valid)
    assert out.num_clusters.tolist() == [3, 4]
    assert out.seeds.tolist() == [[0, 2, 3, -1], [0, 1, 2, 3]]
    assert out.cluster_valid.tolist() == [[True, True, True, False], [True] * 4]
    eye = torch.eye(4)
    assert torch.equal(out.masks[1], eye)
    assert torch.equal(out.masks[0], torch.stack([eye[0], eye[2], eye[3], torch.zeros(4)]))


def test_resampler_masks_are_attention_over_valid_tokens() -> None:
    torch.manual_seed(0)
    module = Resampler(8, num_queries=5, num_heads=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 8, generator=g)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 5:] = False
    tokens, out = module(x, valid)
    assert tokens.shape == (2, 5, 8)
    assert out.masks.shape == (2, 5, 7) and out.masks.dtype == torch.float32
    assert_close(out.masks.sum(-1), torch.ones(2, 5))
    assert torch.equal(out.masks[1, :, 5:].detach(), torch.zeros(5, 2))
    assert out.cluster_valid.all() and out.num_clusters.tolist() == [5, 5]
    assert (out.seeds == -1).all()
    # padding values do not matter; learnable queries and features both get gradients
    x2 = x.clone()
    x2[1, 5:] = 1e3
    tokens2, _ = module(x2, valid)
    assert_close(tokens2, tokens)
    xg = x.clone().requires_grad_(True)
    tok, _ = module(xg, valid)
    tok.square().sum().backward()
    assert xg.grad.abs().sum() > 0 and module.queries.grad.abs().sum() > 0
    assert torch.equal(xg.grad[1, 5:], torch.zeros(2, 8))
