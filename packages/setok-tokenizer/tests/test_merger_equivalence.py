"""ClusterMerger: the batched path against the per-cluster loop reference, and its ablations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from setok_tokenizer.merger import ClusterMerger
from setok_tokenizer.position import sincos_2d


def _hard_masks(gen: torch.Generator, b: int, k: int, n: int) -> torch.Tensor:
    labels = torch.randint(0, k, (b, n), generator=gen)
    return torch.nn.functional.one_hot(labels, k).permute(0, 2, 1).float()


def _soft_masks(gen: torch.Generator, b: int, k: int, n: int) -> torch.Tensor:
    logits = torch.randn(b, k, n, generator=gen) * 2
    masks = logits.softmax(dim=1)
    return masks * (torch.rand(b, k, n, generator=gen) > 0.3)  # exact zeros too


def _case(seed: int, soft: bool, b: int = 3, k: int = 5, h: int = 4, w: int = 5, d: int = 16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, w, d, generator=gen)
    masks = (_soft_masks if soft else _hard_masks)(gen, b, k, h * w)
    valid = torch.ones(b, k, dtype=torch.bool)
    valid[0, -1] = False  # an invalid cluster (its mask is non-zero: must be ignored)
    valid[1, 2:] = False
    masks[2, 1] = 0.0  # an empty but "valid" cluster
    return x, masks, valid


@pytest.mark.parametrize("relative_pe", [False, True])
@pytest.mark.parametrize("layout", ["rows", "image", "auto"])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("out_dim", [None, 24])
def test_batched_equals_loop(
    soft: bool, out_dim: int | None, layout: str, relative_pe: bool
) -> None:
    torch.manual_seed(0)
    merger = ClusterMerger(
        16, num_blocks=2, num_heads=2, out_dim=out_dim, relative_pe=relative_pe
    ).eval()
    x, masks, valid = _case(1, soft)
    batched = merger(x, masks, valid, layout=layout)
    loop = merger.forward_loop(x, masks, valid)
    assert batched.shape == (3, 5, out_dim or 16)
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=1e-4)
    # invalid and empty clusters give zero tokens, the others do not
    assert batched[0, -1].abs().max() == 0 and batched[1, 2:].abs().max() == 0
    assert batched[2, 1].abs().max() == 0
    assert (batched[valid & (masks.sum(-1) > 0)].abs().sum(-1) > 0).all()


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    b=st.integers(1, 3),
    k=st.integers(1, 6),
    h=st.integers(1, 4),
    w=st.integers(1, 4),
    soft=st.booleans(),
    layout=st.sampled_from(["rows", "image"]),
)
def test_batched_equals_loop_property(
    seed: int, b: int, k: int, h: int, w: int, soft: bool, layout: str
) -> None:
    torch.manual_seed(seed)
    merger = ClusterMerger(8, num_blocks=1, num_heads=2).eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, w, 8, generator=gen)
    masks = (_soft_masks if soft else _hard_masks)(gen, b, k, h * w)
    valid = torch.rand(b, k, generator=gen) > 0.2
    torch.testing.assert_close(
        merger(x, masks, valid, layout=layout),
        merger.forward_loop(x, masks, valid),
        atol=1e-5,
        rtol=1e-4,
    )


@pytest.mark.parametrize("layout", ["rows", "image"])
def test_attention_stays_inside_the_cluster(layout: str) -> None:
    """Features outside a cluster (mask 0) must not change that cluster's token."""
    torch.manual_seed(0)
    merger = ClusterMerger(16).eval()
    x, masks, valid = _case(2, soft=False)
    before = merger(x, masks, valid, layout=layout)
    outside = masks[0, 0] == 0
    x2 = x.clone()
    x2[0].view(-1, 16)[outside] += 5.0
    after = merger(x2, masks, valid, layout=layout)
    torch.testing.assert_close(after[0, 0], before[0, 0])
    assert not torch.allclose(after[0, 1:], before[0, 1:])


def test_auto_layout_picks_the_cheaper_packing() -> None:
    merger = ClusterMerger(16)
    hard = torch.zeros(2, 4, 20)
    hard[:, 0, :17] = 1.0  # one big cluster, three small ones: per-cluster rows waste padding
    hard[:, 1, 17] = hard[:, 2, 18] = hard[:, 3, 19] = 1.0
    counts = hard.sum(-1).long()
    assert merger._cheaper_layout(counts, counts > 0) == "image"
    soft = torch.ones(2, 4, 20) / 4  # every token in every cluster: image packing is 4x longer
    counts = (soft > 0).sum(-1)
    assert merger._cheaper_layout(counts, counts > 0) == "rows"


def test_no_pe_differs_from_pe() -> None:
    torch.manual_seed(0)
    with_pe = ClusterMerger(16, use_pe=True).eval()
    without = ClusterMerger(16, use_pe=False).eval()
    without.load_state_dict(with_pe.state_dict())
    x, masks, valid = _case(3, soft=True)
    a, b = with_pe(x, masks, valid), without(x, masks, valid)
    assert not torch.allclose(a[valid], b[valid], atol=1e-4)
    torch.testing.assert_close(b, without.forward_loop(x, masks, valid), atol=1e-5, rtol=1e-4)


def test_mean_variant_is_masked_mean() -> None:
    merger = ClusterMerger(16, enabled=False)
    assert len(merger.blocks) == 0
    x, masks, valid = _case(4, soft=True)
    got = merger(x, masks, valid)
    feats = x.reshape(3, -1, 16)
    for bi in range(3):
        for ki in range(5):
            m = masks[bi, ki]
            if not valid[bi, ki] or m.sum() == 0:
                assert got[bi, ki].abs().max() == 0
                continue
            manual = (feats[bi] * m[:, None]).sum(0) / m.sum()
            torch.testing.assert_close(got[bi, ki], manual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, merger.forward_loop(x, masks, valid), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["rows", "image"])
def test_gradients_reach_params_features_and_masks(layout: str) -> None:
    torch.manual_seed(0)
    merger = ClusterMerger(16, out_dim=8)
    x, masks, valid = _case(5, soft=True)
    x.requires_grad_(True)
    masks.requires_grad_(True)
    merger(x, masks, valid, layout=layout).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert masks.grad is not None and masks.grad.abs().sum() > 0
    for name, p in merger.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sincos_2d() -> None:
    pe = sincos_2d(3, 4, 16)
    assert pe.shape == (12, 16)
    assert pe.abs().max() <= 1.0
    assert torch.unique(pe, dim=0).shape[0] == 12  # every position distinct
    # raster order: row part equal along a row, column part equal down a column
    torch.testing.assert_close(pe[0, :8], pe[3, :8])
    torch.testing.assert_close(pe[1, 8:], pe[5, 8:])
    odd = sincos_2d(2, 2, 10)
    assert odd.shape == (4, 10) and odd[:, 8:].abs().max() == 0
    with pytest.raises(ValueError, match="dim"):
        sincos_2d(2, 2, 3)


def test_bad_input_names_the_argument() -> None:
    merger = ClusterMerger(16)
    x, masks, valid = _case(6, soft=False)
    with pytest.raises(ValueError, match="x must be"):
        merger(x[..., :8], masks, valid)
    with pytest.raises(ValueError, match="masks must be"):
        merger(x, masks[:, :, :-1], valid)
    with pytest.raises(ValueError, match="cluster_valid"):
        merger(x, masks, valid.float())
    bad = masks.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="batch index 1"):
        merger(x, bad, valid)
    with pytest.raises(ValueError, match="layout"):
        merger(x, masks, valid, layout="diagonal")
    with pytest.raises(ValueError, match="num_heads"):
        ClusterMerger(15, num_heads=2)


def test_relative_pe_describes_the_silhouette_wherever_it_lies() -> None:
    """Offsets from the centroid are the same for a cluster moved across the grid, and differ
    for another silhouette; with relative_pe the token changes with the silhouette even when
    every feature is the same."""
    merger = ClusterMerger(16, num_blocks=1, num_heads=2, relative_pe=True).eval()
    h = w = 6

    def mask(cells: list[tuple[int, int]]) -> torch.Tensor:
        m = torch.zeros(1, 1, h * w)
        for r, c in cells:
            m[0, 0, r * w + c] = 1.0
        return m

    ell = [(0, 0), (1, 0), (2, 0), (2, 1)]
    moved = [(r + 3, c + 4) for r, c in ell]
    bar = [(0, 0), (0, 1), (0, 2), (0, 3)]

    def offsets(cells: list[tuple[int, int]]) -> torch.Tensor:
        m = mask(cells)
        _, _, n = m.nonzero(as_tuple=True)
        zero = torch.zeros_like(n)
        return merger._offsets(h, w, m, zero, zero, n)

    torch.testing.assert_close(offsets(ell), offsets(moved))
    assert not torch.allclose(offsets(ell).mean(0), offsets(bar).mean(0), atol=1e-3)
    x = torch.ones(1, h, w, 16)
    valid = torch.ones(1, 1, dtype=torch.bool)
    plain = ClusterMerger(16, num_blocks=1, num_heads=2, use_pe=False).eval()
    with torch.no_grad():
        assert torch.allclose(plain(x, mask(ell), valid), plain(x, mask(bar), valid))
        assert not torch.allclose(merger(x, mask(ell), valid), merger(x, mask(bar), valid))
    assert not ClusterMerger(16, use_pe=False, relative_pe=True).relative_pe  # w/o PE: none
