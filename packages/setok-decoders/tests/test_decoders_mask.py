"""Mask decoder + Eq. 4 mask loss: shapes, key padding, save/load, each term falls."""

from __future__ import annotations

import pytest
import torch

from setok_decoders.config import MaskDecoderConfig
from setok_decoders.losses import mask_loss, resize_masks
from setok_decoders.mask_decoder import PAD_LOGIT, MaskDecoder


def _decoder(**kw) -> MaskDecoder:
    torch.manual_seed(0)
    cfg = MaskDecoderConfig(token_dim=16, feature_dim=24, hidden_dim=32, num_heads=4, **kw)
    return MaskDecoder(cfg)


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(2, 5, 16, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]).bool()
    features = torch.randn(2, 4, 4, 24, generator=gen)
    return tokens, mask, features


def _objects() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of 16x16 with three rectangles each (one invalid in image 1)."""
    obj = torch.zeros(2, 3, 16, 16)
    obj[0, 0, :8, :8] = 1
    obj[0, 1, 8:, :] = 1
    obj[0, 2, :8, 10:] = 1
    obj[1, 0, :, :6] = 1
    obj[1, 1, 4:12, 8:14] = 1
    obj[1, 2, 0:2, 0:2] = 1
    valid = torch.tensor([[True, True, True], [True, True, False]])
    return obj, valid


def test_shapes_padding_and_resize():
    dec = _decoder(mask_scale=4).eval()
    tokens, mask, features = _batch()
    logits = dec(tokens, mask, features)
    assert logits.shape == (2, 5, 16, 16)
    assert (logits[~mask] == PAD_LOGIT).all()
    changed = tokens.clone()
    changed[~mask] = 50.0
    assert torch.equal(dec(changed, mask, features), logits)
    changed[0, 1] += 1.0
    assert not torch.allclose(dec(changed, mask, features)[0, 0], logits[0, 0])
    assert dec(tokens, mask, features, output_size=(20, 12)).shape == (2, 5, 20, 12)
    with pytest.raises(ValueError, match="features"):
        dec(tokens, mask, features[..., :8])
    with pytest.raises(ValueError, match="mask_scale"):
        _decoder(mask_scale=3)


def test_save_load_identical(tmp_path):
    dec = _decoder(mask_scale=2).eval()
    tokens, mask, features = _batch(1)
    dec.save_pretrained(tmp_path / "md")
    assert not [p for p in (tmp_path / "md").iterdir() if p.name.endswith(".tmp")]
    again = MaskDecoder.from_pretrained(tmp_path / "md").eval()
    assert again.config == dec.config
    assert torch.equal(again(tokens, mask, features), dec(tokens, mask, features))


def test_mask_loss_terms_and_validation():
    tokens, mask, features = _batch()
    obj, ovalid = _objects()
    logits = _decoder()(tokens, mask, features)
    clusters = torch.rand(2, 5, 4, 4).softmax(1)
    out = mask_loss(logits, mask, obj, ovalid, clusters)
    assert out.num_matched == 3 + 2
    for term in (out.kl, out.bce, out.dice):
        assert term.item() > 0
    assert torch.allclose(out.total, out.kl + out.bce + out.dice)
    weighted = mask_loss(logits, mask, obj, ovalid, clusters, kl_weight=0.0, dice_weight=2.0)
    assert torch.allclose(weighted.total, weighted.bce + 2 * weighted.dice)
    assert mask_loss(logits, mask, obj, ovalid).kl.item() == 0.0
    with pytest.raises(ValueError, match="object_valid"):
        mask_loss(logits, mask, obj, ovalid[:, :2])
    with pytest.raises(ValueError, match="cluster_masks"):
        mask_loss(logits, mask, obj, ovalid, clusters[:, :3])


def test_each_mask_loss_term_falls_when_overfitting():
    dec = _decoder(mask_scale=4)
    tokens, mask, features = _batch(2)
    obj, ovalid = _objects()
    cluster_logits = torch.zeros(2, 5, 4, 4).normal_(generator=torch.Generator().manual_seed(3))
    cluster_logits.requires_grad_(True)
    opt = torch.optim.Adam(
        [{"params": dec.parameters(), "lr": 3e-3}, {"params": [cluster_logits], "lr": 0.3}]
    )
    history = []
    for _ in range(60):
        opt.zero_grad()
        clusters = cluster_logits.masked_fill(~mask[:, :, None, None], -1e4).softmax(1)
        out = mask_loss(dec(tokens, mask, features), mask, obj, ovalid, clusters)
        out.total.backward()
        opt.step()
        history.append((out.kl.item(), out.bce.item(), out.dice.item()))
    first, last = history[0], history[-1]
    for name, a, b in zip(("kl", "bce", "dice"), first, last, strict=True):
        assert b < 0.5 * a, (name, a, b)


def test_resize_masks_area():
    obj, _ = _objects()
    small = resize_masks(obj, (4, 4))
    assert small.shape == (2, 3, 4, 4)
    assert torch.allclose(small.sum((-1, -2)) * 16, obj.sum((-1, -2)))


def test_without_pixel_context_masks_come_from_the_tokens_alone():
    dec = _decoder(pixel_context=False)
    tokens, mask, features = _batch()
    logits = dec(tokens, mask, features)
    other = dec(tokens, mask, torch.randn_like(features) * 5)
    assert torch.equal(logits, other)  # the features' values are never read
    moved = dec(tokens + torch.randn_like(tokens), mask, features)
    assert not torch.allclose(logits[mask], moved[mask])
    with_context = _decoder()(tokens, mask, features)
    assert not torch.allclose(with_context, _decoder()(tokens, mask, torch.randn_like(features)))


def test_match_on_decides_which_object_each_token_learns():
    obj, valid = _objects()
    logits = torch.zeros(2, 3, 16, 16, requires_grad=True)
    token_valid = torch.ones(2, 3, dtype=torch.bool)
    # token k's "cluster" is object (k + 1) % 3: matching on it must pair them so
    order = [1, 2, 0]
    clusters = obj[:, order].clone()
    clusters[1, 2] = obj[1, 1]  # image 1's object 2 is invalid: token 2 shares object 1
    out = mask_loss(
        logits, token_valid, obj, valid, kl_weight=0.0, match_on=clusters[:, :, ::4, ::4]
    )
    out.total.backward()
    grad = logits.grad
    # token 0 learns object 1 of image 0: its gradient pulls up exactly object 1's pixels
    assert bool((grad[0, 0][obj[0, 1].bool()] < 0).all())
    assert bool((grad[0, 0][~obj[0, 1].bool()] > 0).all())
    with pytest.raises(ValueError, match="match_on must be"):
        mask_loss(logits, token_valid, obj, valid, match_on=clusters[:, :2])
