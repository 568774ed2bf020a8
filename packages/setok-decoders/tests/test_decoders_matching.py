"""Hungarian matching against brute force, and the mask-consistency KL (Eq. 4)."""

from __future__ import annotations

import itertools

import pytest
import torch

from setok_decoders.losses import mask_consistency_kl, object_distribution
from setok_decoders.matching import hungarian_match, match_masks, pairwise_mask_cost


def _brute_force(cost: torch.Tensor) -> float:
    k, o = cost.shape
    best = float("inf")
    if k <= o:
        for cols in itertools.permutations(range(o), k):
            best = min(best, sum(cost[i, c].item() for i, c in enumerate(cols)))
    else:
        for rows in itertools.permutations(range(k), o):
            best = min(best, sum(cost[r, j].item() for j, r in enumerate(rows)))
    return best


@pytest.mark.parametrize("shape", [(3, 3), (4, 2), (2, 5), (5, 5), (1, 4)])
def test_hungarian_matches_brute_force(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    for _ in range(10):
        cost = torch.rand(shape, generator=gen, dtype=torch.float64)
        rows, cols = hungarian_match(cost)
        assert len(rows) == min(shape)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        got = cost[rows, cols].sum().item()
        assert got == pytest.approx(_brute_force(cost), abs=1e-12)


def test_hungarian_rejects_bad_input():
    with pytest.raises(ValueError, match="cost"):
        hungarian_match(torch.rand(3))
    with pytest.raises(ValueError, match="non-finite"):
        hungarian_match(torch.tensor([[0.0, float("nan")]]))


def test_match_masks_recovers_permutation_and_ignores_invalid():
    gen = torch.Generator().manual_seed(0)
    target = (torch.rand(2, 4, 50, generator=gen) > 0.5).float()
    perm = torch.tensor([2, 0, 3, 1])
    pred = torch.cat([target[:, perm], torch.zeros(2, 1, 50)], dim=1)  # (2, 5, 50)
    pred_valid = torch.ones(2, 5, dtype=torch.bool)
    target_valid = torch.ones(2, 4, dtype=torch.bool)
    target_valid[1, 3] = False
    out = match_masks(pred, pred_valid, target, target_valid)
    rows, cols = out[0]
    assert torch.equal(perm[rows], cols)
    rows1, cols1 = out[1]
    assert 3 not in cols1.tolist() and len(cols1) == 3
    assert torch.equal(perm[rows1], cols1)
    with pytest.raises(ValueError, match="pred_valid"):
        match_masks(pred, pred_valid[:, :3], target, target_valid)


def test_pairwise_costs_minimal_on_identical_masks():
    gen = torch.Generator().manual_seed(1)
    masks = (torch.rand(1, 3, 40, generator=gen) > 0.5).float()
    for kind in ("dice", "iou", "bce_dice"):
        cost = pairwise_mask_cost(masks.clamp(0.01, 0.99), masks, kind=kind)[0]
        assert torch.equal(cost.argmin(1), torch.arange(3)), kind


def _random_case(seed: int, b: int = 2, k: int = 4, o: int = 3, n: int = 30):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, o + 1, (b, n), generator=gen)  # o = background label
    objects = torch.stack([(labels == i).float() for i in range(o)], dim=1)
    logits = torch.randn(b, k, n, generator=gen)
    return objects, logits


def test_kl_zero_when_clusters_equal_object_distribution():
    objects, _ = _random_case(0)
    valid = torch.ones(2, 3, dtype=torch.bool)
    pi, pi_valid = object_distribution(objects, valid)
    # clusters = objects + background, in a shuffled order, plus one empty invalid slot
    perm = torch.tensor([3, 1, 0, 2])
    clusters = torch.cat([pi[:, perm], torch.zeros(2, 1, 30)], dim=1)
    cvalid = torch.cat([pi_valid[:, perm], torch.zeros(2, 1, dtype=torch.bool)], dim=1)
    kl = mask_consistency_kl(clusters, cvalid, objects, valid)
    assert kl.item() < 1e-4
    # a wrong assignment of positions gives a clearly positive KL
    shifted = clusters.roll(1, dims=-1)
    assert mask_consistency_kl(shifted, cvalid, objects, valid).item() > 0.1


def test_kl_grad_reaches_cluster_masks_only_and_falls():
    objects, logits = _random_case(3)
    objects.requires_grad_(True)
    logits.requires_grad_(True)
    cvalid = torch.ones(2, 4, dtype=torch.bool)
    ovalid = torch.ones(2, 3, dtype=torch.bool)
    kl = mask_consistency_kl(logits.softmax(1), cvalid, objects, ovalid)
    kl.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert objects.grad is None

    param = logits.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([param], lr=0.3)
    first = None
    for _ in range(25):
        opt.zero_grad()
        loss = mask_consistency_kl(param.softmax(1), cvalid, objects.detach(), ovalid)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_kl_gradient_flows_through_hard_straight_through_masks():
    """Hard masks are exactly 0/1 in the forward pass; the KL must still reach the soft
    masks behind them (straight-through), or hard assignment could never be trained."""
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 16, requires_grad=True)
    soft = logits.softmax(1)
    hard = torch.nn.functional.one_hot(soft.argmax(1), 3).permute(0, 2, 1).float()
    masks = hard + soft - soft.detach()
    objects = torch.zeros(1, 2, 16)
    objects[0, 0, :6] = 1
    objects[0, 1, 6:10] = 1
    valid = torch.ones(1, 3, dtype=torch.bool)
    loss = mask_consistency_kl(masks, valid, objects, torch.ones(1, 2, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 1e-3


def test_kl_ignores_invalid_clusters_objects_and_positions():
    objects, logits = _random_case(5)
    cvalid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    ovalid = torch.tensor([[True, True, False], [True, True, True]])
    masks = logits.softmax(1)
    base = mask_consistency_kl(masks, cvalid, objects, ovalid)
    changed_masks = masks.clone()
    changed_masks[0, 3] = 5.0  # invalid cluster content
    changed_objects = objects.clone()
    changed_objects[0, 2] = 1.0 - changed_objects[0, 2]  # invalid object content
    again = mask_consistency_kl(changed_masks, cvalid, changed_objects, ovalid)
    assert torch.allclose(base, again)
    pos = torch.ones(2, 30, dtype=torch.bool)
    pos[:, 10:] = False
    part = mask_consistency_kl(masks, cvalid, objects, ovalid, position_valid=pos)
    changed_masks[:, :, 10:] = torch.rand(2, 4, 20)
    assert torch.allclose(
        part, mask_consistency_kl(changed_masks, cvalid, objects, ovalid, position_valid=pos)
    )


def test_kl_rejects_bad_shapes():
    objects, logits = _random_case(7)
    with pytest.raises(ValueError, match="cluster_valid"):
        mask_consistency_kl(logits, torch.ones(2, 3, dtype=torch.bool), objects, torch.ones(2, 3))
    with pytest.raises(ValueError, match="object_masks"):
        mask_consistency_kl(
            logits, torch.ones(2, 4, dtype=torch.bool), objects[:, :, :10], torch.ones(2, 3)
        )
