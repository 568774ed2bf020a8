"""object_vectors: the token of each object, ownership, and the encoder's area mean."""

from __future__ import annotations

import torch

from setokim.model.token_content import object_token_iou, object_vectors


def test_each_object_gets_its_best_token_and_shared_tokens_are_not_owned() -> None:
    # 4x4 grid; cluster 0 = left half, cluster 1 = right half
    clusters = torch.zeros(1, 2, 4, 4)
    clusters[0, 0, :, :2] = 1.0
    clusters[0, 1, :, 2:] = 1.0
    token_mask = torch.ones(1, 2, dtype=torch.bool)
    # objects at full resolution 8x8: A = left half, B and C = two quarters of the right half
    objects = torch.zeros(1, 3, 8, 8)
    objects[0, 0, :, :4] = 1.0
    objects[0, 1, :4, 4:] = 1.0
    objects[0, 2, 4:, 4:] = 1.0
    valid = torch.ones(1, 3, dtype=torch.bool)
    iou = object_token_iou(clusters, token_mask, objects)
    assert torch.allclose(iou[0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(iou[0, 1], torch.tensor([0.0, 0.5, 0.5]))
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    features = torch.arange(16.0).reshape(1, 4, 4, 1)
    out = object_vectors(tokens, token_mask, clusters, features, objects, valid)
    assert out.owned.tolist() == [True, True, False]  # B and C share token 1; B wins the tie
    assert torch.equal(out.token, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))
    # encoder vector: mean feature over the object's area (B covers rows 0-1, cols 2-3)
    assert torch.allclose(out.encoder[1], torch.tensor([(2 + 3 + 6 + 7) / 4.0]))


def test_invalid_objects_and_tokens_take_no_part() -> None:
    clusters = torch.ones(1, 2, 2, 2)
    token_mask = torch.tensor([[True, False]])
    objects = torch.ones(1, 2, 4, 4)
    valid = torch.tensor([[True, False]])
    out = object_vectors(
        torch.eye(2)[None], token_mask, clusters, torch.zeros(1, 2, 2, 3), objects, valid
    )
    assert out.token.shape == (1, 2) and torch.equal(out.token[0], torch.tensor([1.0, 0.0]))
    assert out.owned.tolist() == [True]
