"""SeTok end to end on tiny seeded models: shapes, masks, gradients, mechanisms, persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from setok_tokenizer import (
    ClusteringConfig,
    EncoderConfig,
    MergerConfig,
    SeTok,
    SeTokConfig,
    VisionEncoder,
)


def _setok(**clustering) -> SeTok:
    torch.manual_seed(0)
    cfg = SeTokConfig(clustering=ClusteringConfig(max_clusters=8, **clustering))
    return SeTok(cfg).eval()


def _pixels(b: int = 3, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _check_output(model: SeTok, out, b: int = 3) -> None:
    h, w = model.grid_size
    k = int(out.num_tokens.max())
    assert out.tokens.shape == (b, k, model.output_dim)
    assert out.token_mask.shape == (b, k) and out.token_mask.dtype == torch.bool
    assert out.masks.shape == (b, k, h, w)
    assert out.features.shape == (b, h, w, model.encoder.feature_dim)
    assert torch.equal(out.token_mask.sum(1), out.num_tokens)
    assert torch.isfinite(out.tokens).all()
    assert out.tokens[~out.token_mask].abs().sum() == 0
    assert (out.tokens[out.token_mask].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("assignment", ["soft", "hard"])
def test_dynamic_forward_contract(assignment: str) -> None:
    model = _setok(assignment=assignment)
    out = model(_pixels())
    _check_output(model, out)
    assert (out.num_tokens >= 1).all() and (out.num_tokens <= 8).all()
    assert out.scores is not None and out.scores.score.shape == (3, 64)
    per_position = out.masks.sum(1)  # padding slots are zero, so this sums the valid clusters
    torch.testing.assert_close(per_position, torch.ones_like(per_position))
    if assignment == "hard":
        assert set(out.masks.unique().tolist()) <= {0.0, 1.0}
    # seeds point at grid positions; only the remainder cluster and padding have -1
    seeded = out.seeds >= 0
    assert (seeded.sum(1) >= out.num_tokens - 1).all()


def test_batch_of_one_equals_row_of_batch() -> None:
    model = _setok(assignment="hard")
    pixels = _pixels()
    full = model(pixels)
    one = model(pixels[1:2])
    n = int(one.num_tokens[0])
    assert n == int(full.num_tokens[1])
    torch.testing.assert_close(one.tokens[0, :n], full.tokens[1, :n], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "mechanism, expected",
    [("fixed", "max"), ("threshold", None), ("resampler", "max"), ("patch", "grid")],
)
def test_every_mechanism_runs(mechanism: str, expected: str | None) -> None:
    model = _setok(mechanism=mechanism, assignment="hard")
    out = model(_pixels())
    _check_output(model, out)
    h, w = model.grid_size
    if expected == "max":
        assert (out.num_tokens == 8).all()
    elif expected == "grid":
        assert (out.num_tokens == h * w).all()
        assert out.scores is None
    else:
        assert (out.num_tokens >= 1).all() and (out.num_tokens <= 8).all()
    out.tokens.sum().backward()
    trainable = model.merger if model.merger is not None else model.resampler
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.parameters())


def test_fixed_soft_masks_sum_to_one() -> None:
    out = _setok(mechanism="fixed", assignment="soft")(_pixels())
    assert (out.num_tokens == 8).all()
    torch.testing.assert_close(out.masks.sum(1), torch.ones(3, 8, 8))


def test_gradients_reach_merger_and_masks_reach_encoder() -> None:
    torch.manual_seed(0)
    cfg = SeTokConfig(
        encoder=EncoderConfig(freeze=False),
        clustering=ClusteringConfig(max_clusters=8, assignment="soft"),
        merger=MergerConfig(out_dim=24),
    )
    model = SeTok(cfg).train()
    out = model(_pixels())
    assert out.tokens.shape[-1] == model.output_dim == 24
    out.tokens.square().sum().backward()
    for name, p in model.merger.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad()
    # masks alone (no token path) carry gradient back into the encoder through alpha
    out = model(_pixels())
    weights = torch.linspace(0, 1, out.masks.shape[1])[None, :, None, None]
    (out.masks * weights).sum().backward()
    enc_grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert enc_grads and sum(g.abs().sum() for g in enc_grads) > 0


def test_frozen_encoder_gets_no_grad() -> None:
    model = _setok()
    model.train()
    model(_pixels()).tokens.sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert not model.encoder.model.training


@pytest.mark.parametrize("norm", ["layernorm", "none"])
def test_feature_norm_choice_changes_the_clustering(norm: str) -> None:
    # a fixed kernel: the adaptive one is scale-free, so l2 and layernorm may agree
    l2 = _setok(assignment="soft", kernel_scale=2.0)(_pixels())
    other = _setok(assignment="soft", kernel_scale=2.0, feature_norm=norm)(_pixels())
    _check_output(_setok(feature_norm=norm), other)
    same_shape = l2.masks.shape == other.masks.shape
    assert not same_shape or not torch.allclose(l2.masks, other.masks)


def test_merger_ablations_run() -> None:
    for merger in (MergerConfig(enabled=False), MergerConfig(use_pe=False)):
        torch.manual_seed(0)
        model = SeTok(SeTokConfig(clustering=ClusteringConfig(max_clusters=8), merger=merger))
        _check_output(model, model(_pixels()))


def test_save_and_load_round_trip(tmp_path) -> None:
    model = _setok(assignment="hard")
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dir left
    saved = json.loads((tmp_path / "ckpt" / "setok_config.json").read_text())
    assert saved["clustering"]["max_clusters"] == 8
    loaded = SeTok.from_pretrained(tmp_path / "ckpt").eval()
    a, b = model(_pixels()), loaded(_pixels())
    assert torch.equal(a.num_tokens, b.num_tokens)
    torch.testing.assert_close(a.tokens, b.tokens)
    torch.testing.assert_close(a.masks, b.masks)


def test_round_trip_with_a_pretrained_encoder(tmp_path) -> None:
    torch.manual_seed(1)
    VisionEncoder(EncoderConfig(family="dinov2", freeze=False)).save_pretrained(tmp_path / "enc")
    cfg = SeTokConfig(
        encoder=EncoderConfig(family="dinov2", pretrained_path=str(tmp_path / "enc")),
        clustering=ClusteringConfig(max_clusters=6),
    )
    model = SeTok(cfg).eval()
    model.save_pretrained(tmp_path / "setok")
    saved = json.loads((tmp_path / "setok" / "setok_config.json").read_text())
    assert saved["encoder"]["pretrained_path"] is None  # self-contained checkpoint
    loaded = SeTok.from_pretrained(tmp_path / "setok").eval()
    torch.testing.assert_close(loaded(_pixels()).tokens, model(_pixels()).tokens)


def test_tokenize_pil_images() -> None:
    model = _setok(assignment="hard")
    rng = np.random.default_rng(0)
    imgs = [
        Image.fromarray(rng.integers(0, 256, (40 + 10 * i, 60, 3), dtype=np.uint8))
        for i in range(2)
    ]
    out = model.tokenize(imgs)
    _check_output(model, out, b=2)
    assert not out.tokens.requires_grad


def test_bad_input_names_the_argument() -> None:
    model = _setok()
    with pytest.raises(ValueError, match="pixels must be \\(B, C, H, W\\)"):
        model(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="channels"):
        model(torch.zeros(2, 1, 64, 64))
    with pytest.raises(ValueError, match="64x64"):
        model(torch.zeros(2, 3, 48, 48))
    bad = _pixels()
    bad[1, :, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="batch index 1"):
        model(bad)
    with pytest.raises(ValueError, match="max_clusters"):
        SeTok(SeTokConfig(clustering=ClusteringConfig(max_clusters=1)))
    with pytest.raises(ValueError, match="knn_k"):
        SeTok(SeTokConfig(clustering=ClusteringConfig(knn_k=0)))
    with pytest.raises(ValueError, match="mechanism"):
        SeTok(SeTokConfig(clustering=ClusteringConfig(mechanism="kmeans")))
    with pytest.raises(ValueError, match="feature_norm"):
        SeTok(SeTokConfig(clustering=ClusteringConfig(feature_norm="batchnorm")))
    with pytest.raises(FileNotFoundError, match="setok_config.json"):
        SeTok.from_pretrained("no-such-dir")


def test_bf16_model_runs_and_cluster_api() -> None:
    model = _setok(assignment="soft").to(torch.bfloat16)
    out = model(_pixels())
    assert out.tokens.dtype == torch.bfloat16 and out.features.dtype == torch.bfloat16
    _check_output(model, out)
    torch.testing.assert_close(out.masks.float().sum(1), torch.ones(3, 8, 8))
    x = model.normalise(out.features.reshape(3, 64, -1))
    clusters, scores = model.cluster(x)
    assert torch.equal(clusters.num_clusters, out.num_tokens)
    assert scores is not None and torch.equal(scores.score, out.scores.score)
    with pytest.raises(ValueError, match="resampler"):
        _setok(mechanism="resampler").cluster(x.float())
