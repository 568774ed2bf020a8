"""Attribute heads: object means, the loss over present objects only, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from setok_decoders.attributes import IGNORE, AttributeHeads, attribute_loss, object_means


def test_object_means_is_the_mean_over_each_objects_cells_and_zero_when_empty() -> None:
    torch.manual_seed(0)
    features = torch.randn(2, 4, 4, 3)
    masks = torch.zeros(2, 3, 4, 4)  # at the grid's own resolution: no resizing
    masks[0, 0, :2, :2] = 1
    masks[1, 1, 1:, 3] = 1
    got = object_means(features, masks)
    assert got.shape == (2, 3, 3)
    assert torch.allclose(got[0, 0], features[0, :2, :2].reshape(-1, 3).mean(0), atol=1e-6)
    assert torch.allclose(got[1, 1], features[1, 1:, 3].mean(0), atol=1e-6)
    assert torch.equal(got[0, 2], torch.zeros(3))


def test_object_means_weights_partly_covered_cells_by_their_area() -> None:
    features = torch.zeros(1, 2, 2, 1)
    features[0, 0, 0, 0] = 1.0
    masks = torch.zeros(1, 1, 4, 4)  # pixels: 2x2 per cell
    masks[0, 0, :2, :2] = 1  # all of cell (0, 0)
    masks[0, 0, 0, 2] = 1  # a quarter of cell (0, 1), whose feature is 0
    assert object_means(features, masks).item() == pytest.approx(1 / 1.25)


def test_loss_counts_present_objects_only() -> None:
    torch.manual_seed(1)
    heads = AttributeHeads(5, {"colour": 3, "shape": 2})
    features, masks = torch.randn(2, 4, 4, 5), torch.rand(2, 2, 8, 8)
    logits = heads(features, masks)
    labels = {"colour": torch.tensor([[0, 2], [1, IGNORE]]),
              "shape": torch.tensor([[1, 0], [0, IGNORE]])}  # fmt: skip
    keep = labels["colour"] != IGNORE
    want = sum(F.cross_entropy(logits[k][keep], labels[k][keep]) for k in labels)
    assert attribute_loss(logits, labels).item() == pytest.approx(want.item(), rel=1e-6)
    # the ignored slot's logits do not reach the loss
    moved = {k: v.clone() for k, v in logits.items()}
    moved["colour"][1, 1] += 10.0
    assert attribute_loss(moved, labels).item() == pytest.approx(want.item(), rel=1e-6)


def test_heads_learn_a_separable_attribute() -> None:
    torch.manual_seed(2)
    heads = AttributeHeads(2, {"colour": 2})
    opt = torch.optim.Adam(heads.parameters(), lr=0.1)
    masks = torch.ones(8, 1, 4, 4)
    target = torch.arange(8)[:, None] % 2
    features = torch.zeros(8, 4, 4, 2)
    features[..., 0] = target[:, :, None].float() * 2 - 1  # channel 0 tells the colour
    first = attribute_loss(heads(features, masks), {"colour": target}).item()
    for _ in range(50):
        loss = attribute_loss(heads(features, masks), {"colour": target})
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_errors_name_what_is_wrong() -> None:
    heads = AttributeHeads(3, {"colour": 3})
    logits = heads(torch.randn(1, 2, 2, 3), torch.ones(1, 2, 2, 2))
    with pytest.raises(ValueError, match="labels name"):
        attribute_loss(logits, {"shape": torch.zeros(1, 2, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"labels\['colour'\] must be \(1, 2\)"):
        attribute_loss(logits, {"colour": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="features must be"):
        object_means(torch.randn(2, 2, 3), torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match=">= 2 values"):
        AttributeHeads(3, {"colour": 1})


def test_object_tokens_picks_the_valid_cluster_that_overlaps_best() -> None:
    from setok_decoders.attributes import object_tokens

    tokens = torch.arange(3 * 2, dtype=torch.float).view(1, 3, 2).requires_grad_(True)
    clusters = torch.zeros(1, 3, 4, 4)
    clusters[0, 0] = 1  # the whole grid: overlaps every object a little
    clusters[0, 1, :2, :2] = 1  # exactly object 0
    clusters[0, 2, 2:, 2:] = 1  # exactly object 1, but an invalid token
    objects = torch.zeros(1, 2, 8, 8)  # at twice the grid's resolution
    objects[0, 0, :4, :4] = 1
    objects[0, 1, 4:, 4:] = 1
    valid = torch.tensor([[True, True, False]])
    picked = object_tokens(tokens, valid, clusters, objects)
    assert torch.equal(picked[0, 0], tokens[0, 1].detach())
    assert torch.equal(picked[0, 1], tokens[0, 0].detach())  # never the invalid token
    picked.sum().backward()  # the choice has no gradient, the picked tokens do
    assert tokens.grad[0, :, 0].tolist() == [1.0, 1.0, 0.0]
