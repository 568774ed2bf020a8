"""A token painter: each token alone paints its own layer of the image (Stage I, ours).

The spatial-broadcast decoder of object-centric autoencoders (Slot Attention's): every
token is broadcast over a small pixel grid, added to Fourier features of the position, and
one shared per-pixel MLP turns (token, position) into a colour and an opacity logit. The
opacities are a softmax over the image's valid tokens, the image their opacity-weighted
colours. Trained to reconstruct the pixels, a token must hold what it covers: its colour,
and its silhouette (shape, size, position), since no image feature reaches the painter.

Why it is here: on a CPU budget the tiny diffusion decoder reconstructs no better than a
flat image, so it puts no content into the tokens; this reconstruction does. For the same
reason it can be SeTokIM's image decoder at that scale (`decode`, the diffusion decoder's
interface): a Stage I export holds it under painter/ when it was trained.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from setok_decoders.config import PainterConfig
from setok_decoders.io import load_config, load_weights, save_module
from setok_tokenizer.config import from_dict

KIND = "token_painter"


def cell_centres(n: int, device=None, dtype=torch.float32) -> Tensor:
    """(n,) centres of n equal cells spanning [-1, 1]: any grid size maps to one frame."""
    return (torch.arange(n, device=device, dtype=dtype) + 0.5) / n * 2.0 - 1.0


def pixel_grid(size: int) -> Tensor:
    """(size*size, 2) pixel centres (x, y) in [-1, 1], raster order."""
    axis = cell_centres(size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=-1)


def fourier_features(xy: Tensor, frequencies: int) -> Tensor:
    """(..., 2) coordinates -> (..., 2 + 4*frequencies): x, y and their sin/cos at 2^k pi."""
    scales = (2.0 ** torch.arange(frequencies, device=xy.device, dtype=xy.dtype)) * math.pi
    angles = xy[..., None] * scales  # (..., 2, F)
    return torch.cat([xy, angles.sin().flatten(-2), angles.cos().flatten(-2)], dim=-1)


def mask_centroids(masks: Tensor) -> Tensor:
    """(B, K, h, w) non-negative masks -> (B, K, 2) centroids (x, y) in [-1, 1] (0 if empty)."""
    h, w = masks.shape[-2:]
    ys = cell_centres(h, masks.device, masks.dtype)
    xs = cell_centres(w, masks.device, masks.dtype)
    total = masks.sum((-2, -1)).clamp_min(1e-12)
    cx = (masks.sum(-2) * xs).sum(-1) / total
    cy = (masks.sum(-1) * ys).sum(-1) / total
    return torch.stack([cx, cy], dim=-1)


class TokenPainter(nn.Module):
    """tokens (B, K, D) + valid (B, K) -> image (B, 3, S, S) in [0, 1], layers (B, K, S, S)."""

    def __init__(self, config: PainterConfig) -> None:
        super().__init__()
        if config.token_dim is None:
            raise ValueError("painter.token_dim: not set (Stage I fills it from the tokenizer)")
        self.config = config
        self.register_buffer("grid", pixel_grid(config.image_size), persistent=False)
        h = config.hidden_dim
        self.token_proj = nn.Linear(config.token_dim, h)
        self.position_proj = nn.Linear(2 + 4 * config.frequencies, h)
        layers: list[nn.Module] = []
        for _ in range(config.num_layers):
            layers += [nn.GELU(), nn.Linear(h, h)]
        layers += [nn.GELU(), nn.Linear(h, 4)]
        self.mlp = nn.Sequential(*layers)

    def forward(
        self, tokens: Tensor, valid: Tensor, centres: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """centres (B, K, 2) in [-1, 1] (`mask_centroids` of the clusters): needed when
        `config.centred`, where each token paints around its own centre."""
        if not bool(valid.any(dim=1).all()):
            raise ValueError("painter: an image without any valid token")
        b, k, _ = tokens.shape
        s = self.config.image_size
        if self.config.centred:
            if centres is None or centres.shape != (b, k, 2):
                raise ValueError(f"painter: centred needs centres of shape ({b}, {k}, 2)")
            xy = self.grid - centres[:, :, None, :]  # (B, K, P, 2)
        else:
            xy = self.grid
        positions = self.position_proj(fourier_features(xy, self.config.frequencies))
        hidden = self.token_proj(tokens)[:, :, None, :] + positions
        out = self.mlp(hidden)  # (B, K, P, 4)
        colour = torch.sigmoid(out[..., :3])
        logits = out[..., 3].masked_fill(~valid[:, :, None], float("-inf"))
        layers = logits.softmax(dim=1)  # (B, K, P): each pixel shared among the tokens
        image = (layers[..., None] * colour).sum(dim=1)  # (B, P, 3)
        return image.transpose(1, 2).reshape(b, 3, s, s), layers.reshape(b, k, s, s)

    def decode(
        self,
        tokens: Tensor,
        token_mask: Tensor,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Images (B, 3, S, S) in [0, 1] from tokens, as `DiffusionDecoder.decode` gives them.
        The painter is deterministic: steps, guidance and generator do not apply."""
        del num_steps, guidance_scale, generator
        if self.config.centred:
            raise ValueError(
                "painter: a centred painter paints around cluster centroids, which generated "
                "tokens do not have; decode with the diffusion decoder"
            )
        weight = self.token_proj.weight
        image, _ = self(tokens.to(weight.device, weight.dtype), token_mask.to(weight.device).bool())
        return image

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """config.json + model.safetensors (`setok_decoders.io`)."""
        return save_module(self, asdict(self.config), directory, KIND)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> TokenPainter:
        """Rebuild a painter saved by `save_pretrained`."""
        model = cls(from_dict(PainterConfig, load_config(directory, KIND)))
        load_weights(model, directory)
        return model.eval()
