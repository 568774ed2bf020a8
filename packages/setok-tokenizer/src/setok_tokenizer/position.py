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
