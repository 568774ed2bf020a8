"""A token painter: each token alone paints its own layer of the image (Stage I, ours).

The spatial-broadcast decoder of object-centric autoencoders (Slot Attention's): every
token is broadcast over a small pixel grid, added to Fourier features of the position, and
one shared per-pixel MLP turns (token, position) into a colour and an opacity logit. The
opacities are a softmax over the image's valid tokens, the image their opacity-weighted
colours. Trained to reconstruct the pixels, a token must hold what it covers: its colour,
and its silhouette (shape, size, position), since no image feature reaches the painter.

Why it is here: on a CPU budget the tiny diffusion decoder reconstructs no better than a
flat image, so it puts no content into the tokens; this reconstruction does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class PainterConfig:
    """token_dim: the tokenizer's output width (filled in by Stage I when None).
    image_size: the side of the grid painted (the target image is resized to it).
    hidden_dim / num_layers: the per-pixel MLP.
    frequencies: Fourier features per axis (sin and cos of 2^k pi x, k < frequencies).
    """

    token_dim: int | None = None
    image_size: int = 32
    hidden_dim: int = 64
    num_layers: int = 3
    frequencies: int = 6

    def __post_init__(self) -> None:
        for key in ("image_size", "hidden_dim", "num_layers", "frequencies"):
            if getattr(self, key) < 1:
                raise ValueError(f"painter.{key}: must be >= 1, got {getattr(self, key)}")
        if self.token_dim is not None and self.token_dim < 1:
            raise ValueError(f"painter.token_dim: must be >= 1 or null, got {self.token_dim}")


def fourier_positions(size: int, frequencies: int) -> Tensor:
    """(size*size, 2 + 4*frequencies): x, y in [-1, 1] and their sin/cos at 2^k pi."""
    axis = torch.linspace(-1.0, 1.0, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    xy = torch.stack([x.flatten(), y.flatten()], dim=-1)
    scales = (2.0 ** torch.arange(frequencies)) * math.pi
    angles = xy[:, :, None] * scales  # (P, 2, F)
    return torch.cat([xy, angles.sin().flatten(1), angles.cos().flatten(1)], dim=-1)


class TokenPainter(nn.Module):
    """tokens (B, K, D) + valid (B, K) -> image (B, 3, S, S) in [0, 1], layers (B, K, S, S)."""

    def __init__(self, config: PainterConfig) -> None:
        super().__init__()
        if config.token_dim is None:
            raise ValueError("painter.token_dim: not set (Stage I fills it from the tokenizer)")
        self.config = config
        self.register_buffer(
            "positions", fourier_positions(config.image_size, config.frequencies), persistent=False
        )
        h = config.hidden_dim
        self.token_proj = nn.Linear(config.token_dim, h)
        self.position_proj = nn.Linear(self.positions.shape[-1], h)
        layers: list[nn.Module] = []
        for _ in range(config.num_layers):
            layers += [nn.GELU(), nn.Linear(h, h)]
        layers += [nn.GELU(), nn.Linear(h, 4)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, tokens: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        if not bool(valid.any(dim=1).all()):
            raise ValueError("painter: an image without any valid token")
        b, k, _ = tokens.shape
        s = self.config.image_size
        hidden = self.token_proj(tokens)[:, :, None, :] + self.position_proj(self.positions)
        out = self.mlp(hidden)  # (B, K, P, 4)
        colour = torch.sigmoid(out[..., :3])
        logits = out[..., 3].masked_fill(~valid[:, :, None], float("-inf"))
        layers = logits.softmax(dim=1)  # (B, K, P): each pixel shared among the tokens
        image = (layers[..., None] * colour).sum(dim=1)  # (B, P, 3)
        return image.transpose(1, 2).reshape(b, 3, s, s), layers.reshape(b, k, s, s)
