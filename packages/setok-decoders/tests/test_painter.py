"""The token painter: per-token layers that share each pixel, and a reconstruction that a
token's content decides."""

from __future__ import annotations

import pytest
import torch

from setok_decoders import PainterConfig, TokenPainter


def _painter(size: int = 8, dim: int = 6) -> TokenPainter:
    torch.manual_seed(0)
    return TokenPainter(PainterConfig(token_dim=dim, image_size=size, hidden_dim=32, num_layers=2))


def test_layers_share_each_pixel_among_the_valid_tokens_only():
    painter = _painter()
    tokens = torch.randn(2, 3, 6)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    image, layers = painter(tokens, valid)
    assert image.shape == (2, 3, 8, 8) and layers.shape == (2, 3, 8, 8)
    assert torch.allclose(layers.sum(1), torch.ones(2, 8, 8), atol=1e-5)
    assert float(layers[0, 2].abs().max()) == 0.0 and float(layers[1, 1:].abs().max()) == 0.0
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    # an invalid token's content never reaches the image
    changed = tokens.clone()
    changed[0, 2] += 10.0
    assert torch.allclose(painter(changed, valid)[0], image)


def test_an_image_without_valid_tokens_is_an_error():
    with pytest.raises(ValueError, match="without any valid token"):
        _painter()(torch.randn(1, 2, 6), torch.zeros(1, 2, dtype=torch.bool))


@pytest.mark.parametrize("key", ["image_size", "hidden_dim", "num_layers", "frequencies"])
def test_bad_sizes_name_the_key(key):
    with pytest.raises(ValueError, match=f"painter.{key}"):
        PainterConfig(token_dim=4, **{key: 0})


def test_tokens_decide_what_is_painted():
    """Two images with mirrored colours, two free tokens each: the painter sees no pixels,
    so only the tokens can tell the images apart; painting image 0 with image 1's tokens
    gives image 1."""
    painter = _painter(size=8, dim=6)
    target = torch.zeros(2, 3, 8, 8)
    target[0, 0, :, :4] = target[0, 2, :, 4:] = 1.0  # red left, blue right
    target[1, 2, :, :4] = target[1, 0, :, 4:] = 1.0  # blue left, red right
    tokens = torch.nn.Parameter(torch.randn(2, 2, 6) * 0.1)
    valid = torch.ones(2, 2, dtype=torch.bool)
    opt = torch.optim.Adam([*painter.parameters(), tokens], lr=1e-2)
    first = None
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(painter(tokens, valid)[0], target)
        first = float(loss) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.1 * first and float(loss) < 0.02
    with torch.no_grad():
        swapped = painter(tokens.flip(0), valid)[0]
    assert torch.nn.functional.mse_loss(swapped, target.flip(0)) < 0.02


def test_centroids_share_the_pixel_frame_and_centred_painting_moves_with_the_centre():
    from setok_decoders import mask_centroids

    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, 0, 0] = 1.0  # top-left cell
    masks[0, 1, 1:3, 1:3] = 1.0  # the middle
    centres = mask_centroids(masks)
    torch.testing.assert_close(centres, torch.tensor([[[-0.75, -0.75], [0.0, 0.0]]]))
    painter = TokenPainter(PainterConfig(token_dim=6, image_size=8, hidden_dim=16, centred=True))
    tokens, valid = torch.randn(1, 1, 6), torch.ones(1, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="centres"):
        painter(tokens, valid)
    # one token, moved by two pixels (0.5 in [-1, 1] units): its picture moves with it
    tokens2 = tokens.expand(1, 2, 6)
    layers_valid = torch.tensor([[True, False]])
    a, _ = painter(tokens2, layers_valid, torch.tensor([[[0.0, 0.0], [0.0, 0.0]]]))
    b, _ = painter(tokens2, layers_valid, torch.tensor([[[0.5, 0.0], [0.0, 0.0]]]))
    torch.testing.assert_close(b[..., 2:6], a[..., 0:4])


def test_saved_painter_decodes_as_an_image_decoder(tmp_path):
    """Saved and loaded by kind, the painter decodes tokens as the diffusion decoder does:
    (B, 3, S, S) in [0, 1], the same for the same tokens, different for others."""
    from setok_decoders.io import load_config, load_image_decoder

    painter = _painter().eval()
    painter.save_pretrained(tmp_path / "painter")
    again = load_image_decoder(tmp_path / "painter")
    assert isinstance(again, TokenPainter)
    tokens, valid = torch.randn(2, 3, 6), torch.tensor([[True, True, False], [True, False, False]])
    with torch.no_grad():
        image = again.decode(tokens, valid.long(), num_steps=5, guidance_scale=3.0)
        assert image.shape == (2, 3, 8, 8) and 0 <= image.min() <= image.max() <= 1
        torch.testing.assert_close(image, painter(tokens, valid)[0])
        assert (again.decode(tokens + 3.0, valid) - image).abs().mean() > 0.01
    with pytest.raises(ValueError, match="token_painter"):
        load_config(tmp_path / "painter", "diffusion_decoder")


def test_a_centred_painter_refuses_to_decode_generated_tokens():
    torch.manual_seed(0)
    config = PainterConfig(token_dim=6, image_size=8, hidden_dim=16, num_layers=1, centred=True)
    with pytest.raises(ValueError, match="centroids"):
        TokenPainter(config).decode(torch.randn(1, 2, 6), torch.ones(1, 2, dtype=torch.bool))
