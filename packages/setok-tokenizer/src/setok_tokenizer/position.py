"""Fixed 2D sine-cosine position embeddings for a feature grid.

The merger adds these to every cluster's features (paper Section 2.1, X̂ = PE(X)⊙M + X⊙M)
so that a token knows where its region lies in the image. They are not learned, so a
tokenizer trained at one grid size still produces meaningful positions at another.
"""

from __future__ import annotations

import torch


def _sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(P,) positions -> (P, dim) with dim/2 sines then dim/2 cosines (dim even)."""
    half = dim // 2
    freqs = torch.arange(half, dtype=torch.float64) / max(half, 1)
    freqs = 1.0 / (10000.0**freqs)
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(
    h: int, w: int, dim: int, *, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """Position embeddings (h*w, dim) for an h×w grid in raster-scan order (row-major).

    The first half of the channels encodes the row, the second half the column, each with
    sines and cosines over geometric frequencies. When `dim` is not a multiple of 4 the last
    `dim % 4` channels are zero, so any encoder width is accepted.
    """
    if h < 1 or w < 1:
        raise ValueError(f"sincos_2d: h and w must be >= 1, got h={h}, w={w}")
    if dim < 4:
        raise ValueError(f"sincos_2d: dim must be >= 4, got dim={dim}")
    quarter = dim // 4
    rows = torch.arange(h).repeat_interleave(w)  # row index of each raster position
    cols = torch.arange(w).repeat(h)
    emb = torch.cat([_sincos_1d(rows, 2 * quarter), _sincos_1d(cols, 2 * quarter)], dim=1)
    pad = dim - emb.shape[1]
    if pad:
        emb = torch.cat([emb, emb.new_zeros(h * w, pad)], dim=1)
    return emb.to(dtype=dtype, device=device)


def grid_coordinates(h: int, w: int, *, dtype: torch.dtype = torch.float32, device=None):
    """(h*w, 2) (row, column) of each raster position of an h×w grid."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.stack([rows, cols], dim=1).to(dtype)


def sincos_offsets(offsets: torch.Tensor, dim: int) -> torch.Tensor:
    """(E, 2) real (row, column) offsets -> (E, dim) embeddings laid out as `sincos_2d`.

    For offsets from a cluster's centroid: summed over a cluster's positions they describe
    its silhouette wherever it lies (the merger's `relative_pe`)."""
    if dim < 4:
        raise ValueError(f"sincos_offsets: dim must be >= 4, got dim={dim}")
    quarter = dim // 4
    emb = torch.cat(
        [_sincos_1d(offsets[:, 0], 2 * quarter), _sincos_1d(offsets[:, 1], 2 * quarter)], dim=1
    )
    pad = dim - emb.shape[1]
    if pad:
        emb = torch.cat([emb, emb.new_zeros(offsets.shape[0], pad)], dim=1)
    return emb.to(dtype=offsets.dtype)
