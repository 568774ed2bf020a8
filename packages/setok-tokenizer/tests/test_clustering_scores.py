"""density_peak_scores against values worked out by hand from the formulas (docs/design.md §1.3)."""

import math

import pytest
import torch
from torch.testing import assert_close

from setok_tokenizer.clustering import density_peak_scores, pairwise_sq_dists

E = math.exp


def points_1d(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)[None, :, None]  # (1, N, 1)


def test_scores_1d_knn1_with_density_tie() -> None:
    # x = 0, 1, 3, 7.  d2 rows: [0,1,9,49] [1,0,4,36] [9,4,0,16] [49,36,16,0]
    # nearest other: 1, 1, 4, 16 -> rho = e^-1, e^-1, e^-4, e^-16
    # tokens 0 and 1 tie at the top (no strictly denser token): delta = row max 49 and 36;
    # token 2: denser are 0, 1 -> min(9, 4) = 4; token 3: min(49, 36, 16) = 16
    s = density_peak_scores(points_1d(0, 1, 3, 7), knn_k=1)
    rho = torch.tensor([[E(-1), E(-1), E(-4), E(-16)]])
    delta = torch.tensor([[49.0, 36.0, 4.0, 16.0]])
    assert_close(s.rho, rho)
    assert_close(s.delta, delta)
    assert_close(s.score, rho * delta)
    assert s.d2 is None


def test_scores_1d_knn2() -> None:
    # knn means: (1+9)/2 = 5, (1+4)/2 = 2.5, (4+9)/2 = 6.5, (16+36)/2 = 26
    # densest is token 1 -> delta = 36; token 0: denser {1} -> 1; token 2: {0, 1} -> 4;
    # token 3: all -> 16
    s = density_peak_scores(points_1d(0, 1, 3, 7), knn_k=2)
    rho = torch.tensor([[E(-5), E(-2.5), E(-6.5), E(-26)]])
    assert_close(s.rho, rho)
    assert_close(s.delta, torch.tensor([[1.0, 36.0, 4.0, 16.0]]))
    assert_close(s.score, rho * torch.tensor([[1.0, 36.0, 4.0, 16.0]]))


def test_scores_2d_knn2() -> None:
    # (0,0) (1,0) (0,2) (3,3): d2 01=1 02=4 03=18 12=5 13=13 23=10
    # knn-2 means: 2.5, 3, 4.5, 11.5; delta: 0 densest -> max(1,4,18)=18; 1 -> 1;
    # 2 -> min(4,5)=4; 3 -> min(18,13,10)=10
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])
    s = density_peak_scores(x, knn_k=2, keep_d2=True)
    rho = torch.tensor([[E(-2.5), E(-3), E(-4.5), E(-11.5)]])
    delta = torch.tensor([[18.0, 1.0, 4.0, 10.0]])
    assert_close(s.rho, rho)
    assert_close(s.delta, delta)
    assert_close(s.score, rho * delta)
    d2 = torch.tensor([[0, 1, 4, 18], [1, 0, 5, 13], [4, 5, 0, 10], [18, 13, 10, 0.0]])
    assert_close(s.d2[0], d2)


def test_scores_fewer_valid_than_k_and_single_token() -> None:
    # image 0: tokens 0, 2 valid (x=0, x=2), k=5 > 1 other -> mean over the one other = 4,
    # equal rho -> delta = max d2 = 4. image 1: one valid token -> rho 1, delta 0.
    x = torch.tensor([[[0.0], [50.0], [2.0]], [[-3.0], [9.0], [9.0]]])
    valid = torch.tensor([[True, False, True], [False, True, False]])
    s = density_peak_scores(x, knn_k=5, valid=valid)
    assert_close(s.rho, torch.tensor([[E(-4), 0.0, E(-4)], [0.0, 1.0, 0.0]]))
    assert_close(s.delta, torch.tensor([[4.0, 0.0, 4.0], [0.0, 0.0, 0.0]]))
    assert_close(s.score, torch.tensor([[4 * E(-4), 0.0, 4 * E(-4)], [0.0, 0.0, 0.0]]))


def test_padding_is_ignored_even_when_not_finite() -> None:
    x = points_1d(0, 1, 3, 7)
    padded = torch.cat([x, torch.tensor([[[float("nan")], [1.5]]])], dim=1)
    valid = torch.tensor([[True, True, True, True, False, False]])
    s = density_peak_scores(padded, knn_k=1, valid=valid, keep_d2=True)
    ref = density_peak_scores(x, knn_k=1)
    for name in ("rho", "delta", "score"):
        got = getattr(s, name)
        assert_close(got[:, :4], getattr(ref, name))
        assert torch.equal(got[:, 4:], torch.zeros(1, 2))
    assert torch.isinf(s.d2[0, :4, 4:]).all()


def test_distances_are_exactly_symmetric_with_zero_diagonal() -> None:
    x = torch.randn(3, 37, 19, generator=torch.Generator().manual_seed(0)) * 5
    d2 = pairwise_sq_dists(x)
    assert torch.equal(d2, d2.transpose(1, 2))
    assert torch.equal(d2.diagonal(dim1=1, dim2=2), torch.zeros(3, 37))
    assert (d2 >= 0).all()
    assert_close(d2, torch.cdist(x, x) ** 2, rtol=1e-4, atol=1e-3)


def test_bf16_features_give_fp32_scores() -> None:
    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(1))
    s16 = density_peak_scores(x.bfloat16(), knn_k=3)
    s32 = density_peak_scores(x.bfloat16().float(), knn_k=3)
    assert s16.score.dtype == torch.float32
    assert torch.equal(s16.score, s32.score)


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_closest_pair_ties_exactly_with_knn1(seed: int) -> None:
    # With knn_k=1 the two closest tokens are each other's nearest neighbour: mathematically
    # equal densities, so neither is "denser" and both take their row maximum as delta.
    x = torch.randn(2, 40, 6, generator=torch.Generator().manual_seed(seed))
    s = density_peak_scores(x, knn_k=1, keep_d2=True)
    d2 = s.d2 + torch.diag(torch.full((40,), math.inf))
    for b in range(2):
        i, j = divmod(int(d2[b].argmin()), 40)
        assert s.rho[b, i] == s.rho[b, j]
        if s.rho[b, i] == s.rho[b].max():
            assert s.delta[b, i] == s.d2[b, i].max()
            assert s.delta[b, j] == s.d2[b, j].max()
