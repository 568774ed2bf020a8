"""object_grouping_loss: zero for object-pure features, trains features into one peak per object."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from setok_decoders.losses import object_grouping_loss
from setok_tokenizer.mechanisms import cluster_features


def two_objects(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 2, n) masks: object 0 on the first quarter, object 1 on the second; rest background."""
    masks = torch.zeros(1, 2, n)
    masks[0, 0, : n // 4] = 1.0
    masks[0, 1, n // 4 : n // 2] = 1.0
    return masks, torch.ones(1, 2, dtype=torch.bool)


def test_zero_for_orthogonal_object_features_positive_for_mixed() -> None:
    masks, valid = two_objects()
    label = torch.tensor([0] * 4 + [1] * 4 + [2] * 8)
    pure = torch.nn.functional.one_hot(label, 3).float()[None] * 5.0  # any scale
    assert float(object_grouping_loss(pure, masks, valid)) == pytest.approx(0.0, abs=1e-6)
    same = torch.ones(1, 16, 3)
    assert float(object_grouping_loss(same, masks, valid)) == pytest.approx(1.0, abs=1e-6)


def test_border_positions_take_no_part() -> None:
    masks, valid = two_objects()
    masks[0, 0, 0] = 0.3  # a border patch: 30% object, 70% background
    label = torch.tensor([0] * 4 + [1] * 4 + [2] * 8)
    x = torch.nn.functional.one_hot(label, 3).float()[None]
    x[0, 0] = torch.tensor([0.0, 1.0, 0.0])  # looks like object 1: ignored at purity 0.75
    assert float(object_grouping_loss(x, masks, valid, purity=0.75)) == pytest.approx(0.0, abs=1e-6)
    assert float(object_grouping_loss(x, masks, valid, purity=0.5)) > 0.0


def test_shape_errors_name_the_argument() -> None:
    masks, valid = two_objects()
    with pytest.raises(ValueError, match="features must be"):
        object_grouping_loss(torch.randn(1, 15, 4), masks, valid)
    with pytest.raises(ValueError, match="object_valid"):
        object_grouping_loss(torch.randn(1, 16, 4), masks, valid[:, :1])


def test_training_the_features_gives_one_cluster_per_region() -> None:
    """Gradient descent on this loss alone turns random features into one peak per region."""
    masks, valid = two_objects(64)
    x = torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)

    def clusters():
        return cluster_features(F.normalize(x.detach(), dim=-1), "dynamic", max_clusters=8)

    before = clusters().masks[0].argmax(0)
    assert len(set(before[:16].tolist())) > 1  # random features do not follow the objects
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        object_grouping_loss(x, masks, valid).backward()
        opt.step()
    after = clusters()
    assert after.num_clusters.item() == 3
    owner = after.masks[0, :3].argmax(0)
    assert len(set(owner[:16].tolist())) == 1 and len(set(owner[16:32].tolist())) == 1
    assert len(set(owner[32:].tolist())) == 1 and len(set(owner.tolist())) == 3
