"""The mask decoder: each SeTok token becomes one mask over the image.

A light Mask2Former/SAM-style decoder. Tokens are the queries; each layer lets them
cross-attend to the pixel features (encoder grid + 2-D sine positions), self-attend to
each other (padded tokens hidden by the key padding mask) and pass an MLP. The grid is
upsampled by transposed convolutions to per-pixel embeddings; a mask logit is the dot
product of a query embedding with each pixel embedding. With `pixel_context=False` the
pixels are replaced by their positions alone (cross-attention and per-pixel embeddings),
so a mask can only come from what its token carries.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from setok_decoders.config import MaskDecoderConfig
from setok_decoders.io import load_config, load_weights, save_module
from setok_decoders.qformer import check_tokens
from setok_tokenizer.config import from_dict

KIND = "mask_decoder"
PAD_LOGIT = -1e4  # logit written into padded token slots (sigmoid ~ 0, finite for losses)


def sine_positions_2d(h: int, w: int, dim: int, device=None) -> Tensor:
    """Fixed 2-D sine/cosine position codes (h*w, dim); dim must be divisible by 4."""
    if dim % 4:
        raise ValueError(f"hidden_dim must be divisible by 4 for 2-D positions, got {dim}")
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    ay = ys.flatten()[:, None] * freqs
    ax = xs.flatten()[:, None] * freqs
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=-1)


class MaskDecoderLayer(nn.Module):
    """Pre-norm: cross-attention to pixels, self-attention among tokens, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_cross = nn.LayerNorm(dim)
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, q: Tensor, pixels: Tensor, pixel_pos: Tensor, pad: Tensor) -> Tensor:
        x = self.norm_cross(q)
        q = q + self.cross(x, pixels + pixel_pos, pixels, need_weights=False)[0]
        x = self.norm_self(q)
        q = q + self.self_attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        return q + self.mlp(self.norm_mlp(q))


class MaskDecoder(nn.Module):
    """(tokens (B, K, dt), token_mask (B, K), features (B, h, w, df)) -> logits (B, K, H, W)."""

    def __init__(self, config: MaskDecoderConfig) -> None:
        super().__init__()
        scale = config.mask_scale
        self.config = config
        dim = config.hidden_dim
        self.token_proj = nn.Linear(config.token_dim, dim)
        self.feature_proj = nn.Linear(config.feature_dim, dim) if config.pixel_context else None
        self.layers = nn.ModuleList(
            MaskDecoderLayer(dim, config.num_heads, config.mlp_ratio)
            for _ in range(config.num_layers)
        )
        self.query_norm = nn.LayerNorm(dim)
        self.query_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        ups: list[nn.Module] = []
        for _ in range(int(math.log2(scale))):
            ups += [nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.GroupNorm(1, dim), nn.GELU()]
        ups.append(nn.Conv2d(dim, dim, 1))
        self.pixel_head = nn.Sequential(*ups)

    def forward(
        self,
        tokens: Tensor,
        token_mask: Tensor,
        features: Tensor,
        output_size: tuple[int, int] | None = None,
    ) -> Tensor:
        """Mask logits per token; padded slots hold PAD_LOGIT; optionally resized bilinearly."""
        check_tokens(tokens, token_mask, self.config.token_dim)
        if features.dim() != 4 or features.shape[-1] != self.config.feature_dim:
            raise ValueError(
                f"features must be (B, h, w, {self.config.feature_dim}), "
                f"got {tuple(features.shape)}"
            )
        if features.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"features batch {features.shape[0]} != tokens batch {tokens.shape[0]}"
            )
        bsz, h, w, _ = features.shape
        valid = token_mask.bool()
        pos = sine_positions_2d(h, w, self.config.hidden_dim, features.device)
        if self.feature_proj is not None:
            pixels = self.feature_proj(features).flatten(1, 2)  # (B, h*w, dim)
        else:  # positions only: the masks must come from the tokens
            pixels = pos[None].expand(bsz, -1, -1).to(tokens.dtype)
        pos = pos.to(pixels.dtype)
        q = self.token_proj(tokens)
        for layer in self.layers:
            q = layer(q, pixels, pos[None], ~valid)
        q = self.query_head(self.query_norm(q))
        # Without pixel context every image has the same per-pixel embeddings: compute once.
        grid = pixels[: 1 if self.feature_proj is None else bsz].transpose(1, 2)
        per_pixel = self.pixel_head(grid.reshape(grid.shape[0], -1, h, w))  # (B or 1, dim, H, W)
        logits = torch.einsum("bkc,bchw->bkhw", q, per_pixel.expand(bsz, -1, -1, -1))
        if output_size is not None and tuple(output_size) != tuple(logits.shape[-2:]):
            logits = F.interpolate(logits, size=tuple(output_size), mode="bilinear")
        return logits.masked_fill(~valid[:, :, None, None], PAD_LOGIT)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """config.json + model.safetensors, written atomically."""
        return save_module(self, asdict(self.config), directory, KIND)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> MaskDecoder:
        """Rebuild a decoder saved by `save_pretrained`."""
        model = cls(from_dict(MaskDecoderConfig, load_config(directory, KIND)))
        load_weights(model, directory)
        return model
