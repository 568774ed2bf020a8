"""Where each token's cluster lies (`setok_tokenizer.geometry`), checked against boxes drawn
by hand and a plain per-cluster loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from setok_tokenizer.geometry import (
    GEOMETRY_FIELDS,
    fourier_features,
    fourier_width,
    token_geometry,
)


def _box_mask(h: int, w: int, top: int, left: int, bottom: int, right: int) -> torch.Tensor:
    mask = torch.zeros(h, w)
    mask[top:bottom, left:right] = 1.0
    return mask


def test_a_drawn_box_gives_its_edges_centre_and_size():
    masks = torch.stack([_box_mask(16, 16, 2, 4, 6, 12), _box_mask(16, 16, 8, 0, 16, 16)])[None]
    geometry = token_geometry(masks, torch.tensor([[True, True]]))
    field = dict(zip(GEOMETRY_FIELDS, geometry[0, 0].tolist(), strict=True))
    assert field["top"] == pytest.approx(2 / 16) and field["bottom"] == pytest.approx(6 / 16)
    assert field["left"] == pytest.approx(4 / 16) and field["right"] == pytest.approx(12 / 16)
    assert field["centre_y"] == pytest.approx(4 / 16) and field["centre_x"] == pytest.approx(0.5)
    assert field["sqrt_area"] == pytest.approx((32 / 256) ** 0.5)
    lower = dict(zip(GEOMETRY_FIELDS, geometry[0, 1].tolist(), strict=True))
    assert lower["centre_y"] == pytest.approx(0.75) and lower["sqrt_area"] == pytest.approx(
        0.5**0.5
    )


def test_invalid_tokens_and_empty_masks_give_zeros():
    masks = torch.stack(
        [_box_mask(8, 8, 0, 0, 4, 4), torch.zeros(8, 8), _box_mask(8, 8, 4, 4, 8, 8)]
    )
    geometry = token_geometry(masks[None], torch.tensor([[True, True, False]]))
    assert geometry[0, 0].abs().sum() > 0
    assert torch.equal(geometry[0, 1:], torch.zeros(2, len(GEOMETRY_FIELDS)))


def test_soft_masks_take_the_box_of_their_strong_cells():
    mask = _box_mask(8, 8, 2, 2, 4, 4) + 0.1 * torch.ones(8, 8)  # faint weight everywhere
    field = dict(
        zip(
            GEOMETRY_FIELDS,
            token_geometry(mask[None, None], torch.tensor([[True]]))[0, 0].tolist(),
            strict=True,
        )
    )
    assert (field["top"], field["left"]) == (pytest.approx(2 / 8), pytest.approx(2 / 8))
    assert (field["bottom"], field["right"]) == (pytest.approx(4 / 8), pytest.approx(4 / 8))


def _loop_reference(masks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One cluster at a time, from the member cells' (row, column) list."""
    b, k, h, w = masks.shape
    out = torch.zeros(b, k, len(GEOMETRY_FIELDS))
    for i in range(b):
        for j in range(k):
            m = masks[i, j]
            if not valid[i, j] or m.sum() <= 0:
                continue
            rows, cols = torch.nonzero(m >= 0.5 * m.max(), as_tuple=True)
            cy = (
                sum(float(m[r, c]) * (r + 0.5) for r, c in torch.nonzero(m > 0).tolist())
                / float(m.sum())
                / h
            )
            cx = (
                sum(float(m[r, c]) * (c + 0.5) for r, c in torch.nonzero(m > 0).tolist())
                / float(m.sum())
                / w
            )
            out[i, j] = torch.tensor([cy, cx, rows.min() / h, cols.min() / w, (rows.max() + 1) / h,
                                      (cols.max() + 1) / w, (float(m.sum()) / (h * w)) ** 0.5])  # fmt: skip
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 3), st.integers(1, 5), st.booleans())
def test_batched_geometry_matches_the_loop(seed, b, k, hard):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(b, k, 6, 7, generator=g)
    if hard:
        masks = (masks > 0.6).float()
    valid = torch.rand(b, k, generator=g) > 0.3
    got = token_geometry(masks, valid)
    torch.testing.assert_close(got, _loop_reference(masks, valid), atol=1e-5, rtol=1e-5)
    assert float(got.min()) >= 0 and float(got.max()) <= 1
    perm = torch.randperm(k, generator=g)  # each token's geometry is its own cluster's
    torch.testing.assert_close(token_geometry(masks[:, perm], valid[:, perm]), got[:, perm])


def test_fourier_features_separate_nearby_positions():
    geometry = torch.zeros(2, len(GEOMETRY_FIELDS))
    geometry[1, 1] = 1 / 32  # half a cell of a 16x16 grid
    features = fourier_features(geometry)
    assert features.shape == (2, fourier_width())
    assert float((features[0] - features[1]).abs().max()) > 0.5
    with pytest.raises(ValueError, match="num_frequencies"):
        fourier_features(geometry, -1)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="token_mask"):
        token_geometry(torch.zeros(1, 2, 4, 4), torch.ones(1, 3, dtype=torch.bool))
