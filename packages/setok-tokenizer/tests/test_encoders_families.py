"""VisionEncoder: every transformers family, tiny on CPU, layers, freezing, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from setok_tokenizer.config import EncoderConfig
from setok_tokenizer.encoders import VisionEncoder

FAMILIES = ["vit", "siglip", "clip", "dinov2", "dinov2_registers", "convnext"]


def _encoder(family: str, **kw) -> VisionEncoder:
    torch.manual_seed(0)
    return VisionEncoder(EncoderConfig(family=family, image_size=64, **kw))


def _pixels(b: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_family_grid_shape_and_layers(family: str) -> None:
    last = _encoder(family, layer="last")
    pen = _encoder(family, layer="penultimate")
    pen.load_state_dict(last.state_dict())
    h, w = last.grid_size
    assert (h, w) == (8, 8)  # tiny presets: 64px images, stride 8
    with torch.no_grad():
        a, b = last(_pixels()), pen(_pixels())
    assert a.shape == (2, h, w, last.feature_dim) == b.shape
    assert torch.isfinite(a).all()
    assert not torch.allclose(a, b, atol=1e-4)
    # per-image independence: the grid of image 0 does not depend on image 1
    with torch.no_grad():
        single = last(_pixels()[:1])
    torch.testing.assert_close(single, a[:1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_freeze_means_no_grads_and_eval(family: str) -> None:
    enc = _encoder(family, freeze=True)
    enc.train()
    assert not enc.model.training
    assert all(not p.requires_grad for p in enc.parameters())
    pixels = _pixels().requires_grad_(True)
    enc(pixels).sum().backward()
    assert pixels.grad is not None  # still differentiable in the input
    assert all(p.grad is None for p in enc.parameters())

    trainable = _encoder(family, freeze=False)
    trainable.train()
    assert trainable.model.training
    trainable(_pixels()).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.parameters())


@pytest.mark.parametrize("family", ["siglip", "convnext", "dinov2_registers"])
def test_save_and_load_round_trip(family: str, tmp_path) -> None:
    enc = _encoder(family, layer="penultimate")
    enc.save_pretrained(tmp_path / "enc")
    assert not list(tmp_path.glob(".enc.*"))  # no temp dir left behind
    loaded = VisionEncoder.from_pretrained(tmp_path / "enc")
    assert loaded.cfg.layer == "penultimate" and loaded.family == family
    with torch.no_grad():
        torch.testing.assert_close(loaded(_pixels()), enc(_pixels()))
    # saving again over an existing directory replaces it atomically
    enc.save_pretrained(tmp_path / "enc")
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["enc"]


def test_plain_transformers_checkpoint_is_recognised(tmp_path) -> None:
    enc = _encoder("clip")
    enc.model.save_pretrained(tmp_path / "hf")  # no setok files, only transformers'
    loaded = VisionEncoder.from_pretrained(tmp_path / "hf", layer="last")
    assert loaded.family == "clip" and loaded.image_size == 64
    with torch.no_grad():
        torch.testing.assert_close(loaded(_pixels()), enc(_pixels()))
    # same checkpoint through EncoderConfig.pretrained_path, at another resolution
    other = VisionEncoder(
        EncoderConfig(family="clip", pretrained_path=str(tmp_path / "hf"), image_size=96)
    )
    with torch.no_grad():
        assert other(_pixels(size=96)).shape == (2, 12, 12, 32)


def test_pretrained_path_must_exist(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="pretrained_path"):
        VisionEncoder(EncoderConfig(family="vit", pretrained_path=str(tmp_path / "nope")))


def test_bad_input_names_the_argument() -> None:
    enc = _encoder("vit")
    with pytest.raises(ValueError, match="pixels must be \\(B, C, H, W\\)"):
        enc(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="pixels must have 3 channels"):
        enc(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match="pixels must be 64x64"):
        enc(torch.zeros(1, 3, 32, 64))
    bad = torch.zeros(3, 3, 64, 64)
    bad[2, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="batch index 2"):
        enc(bad)
    with pytest.raises(ValueError, match="family"):
        VisionEncoder(EncoderConfig(family="resnet"))
    with pytest.raises(ValueError, match="layer"):
        VisionEncoder(EncoderConfig(layer="first"))
    with pytest.raises(ValueError, match="penultimate"):
        VisionEncoder(EncoderConfig(layer="penultimate", overrides={"num_hidden_layers": 1}))


def test_preprocess_pil_and_tensor(tmp_path) -> None:
    enc = _encoder("clip")
    rng = np.random.default_rng(0)
    imgs = [
        Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (80, 80), dtype=np.uint8)),  # grey
    ]
    pixels = enc.preprocess(imgs)
    assert pixels.shape == (2, 3, 64, 64)
    # CLIP normalisation: a mid-grey image maps to (0.5 - mean) / std
    grey = enc.preprocess(torch.full((1, 3, 64, 64), 0.5))
    expected = (0.5 - enc.pixel_mean) / enc.pixel_std
    torch.testing.assert_close(grey, expected.expand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="images"):
        enc.preprocess([])
