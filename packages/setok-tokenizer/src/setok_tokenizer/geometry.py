"""Where each token's cluster lies: its centroid, box and size, from SeTok's cluster masks.

A merged token holds its cluster's position only as the mean of its members' position
embeddings after the merger's blocks, and a model that reads the tokens must recover it
from there. For questions about where objects are or which is bigger (and for boxes), the
cluster masks give the answer exactly; `token_geometry` reads it off them and
`fourier_features` encodes it for a linear layer (setokim's `visual_geometry`).
"""

from __future__ import annotations

import math

import torch

GEOMETRY_FIELDS = ("centre_y", "centre_x", "top", "left", "bottom", "right", "sqrt_area")
FREQUENCIES = 6  # the finest at 1/32 of the image: half a cell of a 16x16 grid


def token_geometry(masks: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """(B,K,h,w) cluster masks, (B,K) bool -> (B,K,7) `GEOMETRY_FIELDS`, each in [0, 1].

    Centre: the mask-weighted centroid of the cells' centres. Box: the cells holding at
    least half of the cluster's largest weight (all members of a hard mask), edges at cell
    borders. sqrt_area: the square root of the mask's total weight over the grid's cells.
    Invalid tokens and empty masks give zeros.
    """
    if masks.ndim != 4 or token_mask.shape != masks.shape[:2]:
        raise ValueError(
            f"masks must be (B,K,h,w) and token_mask (B,K); got {tuple(masks.shape)} and "
            f"{tuple(token_mask.shape)}"
        )
    b, k, h, w = masks.shape
    weights = masks.float().clamp_min(0) * token_mask[..., None, None].float()
    total = weights.sum((-2, -1))  # (B,K)
    keep = total > 0
    rows = (torch.arange(h, device=masks.device, dtype=torch.float32) + 0.5) / h
    cols = (torch.arange(w, device=masks.device, dtype=torch.float32) + 0.5) / w
    safe = total.clamp_min(1e-12)
    centre_y = (weights.sum(-1) * rows).sum(-1) / safe
    centre_x = (weights.sum(-2) * cols).sum(-1) / safe
    peak = weights.flatten(2).amax(-1)[..., None, None]
    member = (weights >= 0.5 * peak) & (weights > 0)
    in_row, in_col = member.any(-1), member.any(-2)  # (B,K,h), (B,K,w)
    index_h = torch.arange(h, device=masks.device)
    index_w = torch.arange(w, device=masks.device)
    top = torch.where(in_row, index_h, h).amin(-1).float() / h
    bottom = (torch.where(in_row, index_h, -1).amax(-1).float() + 1) / h
    left = torch.where(in_col, index_w, w).amin(-1).float() / w
    right = (torch.where(in_col, index_w, -1).amax(-1).float() + 1) / w
    sqrt_area = (total / (h * w)).clamp(0, 1).sqrt()
    geometry = torch.stack([centre_y, centre_x, top, left, bottom, right, sqrt_area], -1)
    return geometry * keep[..., None].float()


def fourier_features(geometry: torch.Tensor, num_frequencies: int = FREQUENCIES) -> torch.Tensor:
    """(..., F) values in [0, 1] -> (..., F * (1 + 2 * num_frequencies)): each value, then
    its sines and cosines at 2^j * pi (j < num_frequencies), so that a linear layer can tell
    nearby positions apart."""
    if num_frequencies < 0:
        raise ValueError(f"num_frequencies must be >= 0, got {num_frequencies}")
    scales = math.pi * 2.0 ** torch.arange(num_frequencies, device=geometry.device)
    angles = geometry[..., None] * scales.to(geometry.dtype)  # (..., F, J)
    parts = [geometry[..., None], angles.sin(), angles.cos()]
    return torch.cat(parts, -1).flatten(-2)


def fourier_width(num_frequencies: int = FREQUENCIES) -> int:
    """The last dimension of `fourier_features` for `token_geometry`'s output."""
    return len(GEOMETRY_FIELDS) * (1 + 2 * num_frequencies)
