"""The cluster merger: one token per cluster (paper Section 2.1, "Cluster Merger").

Each cluster's features are weighted by its mask and given 2D positions,
X̂ = PE(X)⊙M + X⊙M, passed through L transformer blocks whose self-attention stays inside
the cluster, and average-pooled with the mask as weights. All clusters of all images go
through each block as ONE batched attention call: only (cluster, token) entries with mask
weight > 0 are gathered and packed either per cluster (padded, key-padding mask) or per
image (block-diagonal mask), whichever is cheaper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from setok_tokenizer.position import grid_coordinates, sincos_2d, sincos_offsets


class MergerBlock(nn.Module):
    """Post-norm transformer block: x = LN(x + MHSA(x)); x = LN(x + FFN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (G, L, D); attn_mask bool, broadcastable to (G, heads, L, L): True = may attend."""
        r, length, dim = x.shape
        q, k, v = (
            self.qkv(x)
            .view(r, length, 3, self.num_heads, dim // self.num_heads)
            .permute(2, 0, 3, 1, 4)
        )
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        a = a.transpose(1, 2).reshape(r, length, dim)
        x = self.norm1(x + self.attn_out(a))
        return self.norm2(x + self.mlp(x))


class ClusterMerger(nn.Module):
    """Merge the features of each cluster into one token.

    enabled=False is the paper's "w/o merger" ablation: the token is the mask-weighted mean
    of the raw features (no PE, no blocks). use_pe=False is "w/o PE". relative_pe (ours)
    adds to each member a second embedding of its offset from the cluster's mask-weighted
    centroid, so that the pooled token describes the cluster's silhouette independently of
    where it lies (the absolute PE says where). Invalid clusters and clusters with no
    positive mask weight give zero tokens.
    """

    def __init__(
        self,
        dim: int,
        num_blocks: int = 2,
        num_heads: int = 2,
        mlp_ratio: float = 4.0,
        use_pe: bool = True,
        enabled: bool = True,
        out_dim: int | None = None,
        relative_pe: bool = False,
    ) -> None:
        super().__init__()
        if dim < 4:
            raise ValueError(f"dim must be >= 4, got {dim}")
        if enabled and num_blocks < 1:
            raise ValueError(
                f"num_blocks must be >= 1 when the merger is enabled, got {num_blocks}"
            )
        self.dim = dim
        self.use_pe = use_pe
        self.enabled = enabled
        self.relative_pe = relative_pe and use_pe and enabled
        self.blocks = nn.ModuleList(
            [MergerBlock(dim, num_heads, mlp_ratio) for _ in range(num_blocks if enabled else 0)]
        )
        self.proj = nn.Linear(dim, out_dim) if out_dim is not None else None
        self.out_dim = out_dim if out_dim is not None else dim

    # ------------------------------------------------------------------ checks
    def _check(
        self, x: torch.Tensor, masks: torch.Tensor, cluster_valid: torch.Tensor
    ) -> tuple[int, int, int, int]:
        if x.ndim != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, h, w, {self.dim}), got {tuple(x.shape)}")
        b, h, w, _ = x.shape
        if masks.ndim != 3 or masks.shape[0] != b or masks.shape[2] != h * w:
            raise ValueError(f"masks must be (B={b}, K, N={h * w}), got {tuple(masks.shape)}")
        k = masks.shape[1]
        if cluster_valid.shape != (b, k) or cluster_valid.dtype != torch.bool:
            raise ValueError(
                f"cluster_valid must be a bool tensor of shape ({b}, {k}), "
                f"got {cluster_valid.dtype} {tuple(cluster_valid.shape)}"
            )
        bad = ~torch.isfinite(masks).all(dim=(1, 2)) | (masks < 0).any(dim=2).any(dim=1)
        if bad.any():
            raise ValueError(
                f"masks must be finite and >= 0 (batch index {int(bad.nonzero()[0, 0])})"
            )
        return b, h, w, k

    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw features, merger input with PE) both (B, N, D)."""
        b, h, w, d = x.shape
        feats = x.reshape(b, h * w, d)
        if self.enabled and self.use_pe:
            return feats, feats + sincos_2d(h, w, d, dtype=x.dtype, device=x.device)
        return feats, feats

    def _offsets(
        self,
        h: int,
        w: int,
        weights: torch.Tensor,
        b_idx: torch.Tensor,
        k_idx: torch.Tensor,
        n_idx: torch.Tensor,
    ) -> torch.Tensor:
        """Relative PE of entries (b, k, n): position n minus cluster (b, k)'s centroid."""
        coords = grid_coordinates(h, w, dtype=weights.dtype, device=weights.device)
        total = weights.sum(-1, keepdim=True).clamp_min(1e-12)
        centroids = (weights @ coords) / total  # (B, K, 2)
        return sincos_offsets(coords[n_idx] - centroids[b_idx, k_idx], self.dim)

    def _finish(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            tokens = self.proj(tokens)
        return tokens * keep[..., None].to(tokens.dtype)

    # ------------------------------------------------------------------ batched
    def forward(
        self,
        x: torch.Tensor,
        masks: torch.Tensor,
        cluster_valid: torch.Tensor,
        *,
        layout: str = "auto",
    ) -> torch.Tensor:
        """x (B,h,w,D), masks (B,K,N), cluster_valid (B,K) bool -> tokens (B,K,out_dim).

        layout: how entries are packed for the blocks — "rows" (one padded sequence per
        cluster), "image" (one per image with block-diagonal attention; no padding waste for
        hard masks) or "auto" (the one with fewer estimated FLOPs). Results are the same.
        """
        if layout not in ("auto", "rows", "image"):
            raise ValueError(f"layout must be 'auto', 'rows' or 'image', got {layout!r}")
        b, _, _, k = self._check(x, masks, cluster_valid)
        d = self.dim
        feats, inp = self._inputs(x)
        weights = masks.to(x.dtype) * cluster_valid[..., None].to(x.dtype)
        selected = weights > 0  # (B, K, N)
        counts = selected.sum(-1)  # (B, K)
        keep = counts > 0
        if not self.enabled:
            total = weights.sum(-1, keepdim=True)
            tokens = torch.einsum("bkn,bnd->bkd", weights, feats) / total.clamp_min(1e-12)
            return self._finish(tokens, keep)

        eb, ek, en = selected.nonzero(as_tuple=True)  # entries, ordered by (image, cluster)
        m = weights[eb, ek, en]
        entries = inp[eb, en]  # X + PE, one row per (b, k, n) entry
        if self.relative_pe:
            entries = entries + self._offsets(x.shape[1], x.shape[2], weights, eb, ek, en)
        entries = entries * m[:, None]  # X̂ = (X + PE) ⊙ M
        if eb.numel() == 0:
            return self._finish(x.new_zeros(b, k, d), keep)
        if layout == "auto":
            layout = self._cheaper_layout(counts, keep)
        if layout == "rows":  # one sequence per non-empty cluster
            group = (keep.flatten().long().cumsum(0) - 1)[eb * k + ek]
            sizes = counts[keep]
        else:  # "image": one sequence per image, block-diagonal attention
            group, sizes = eb, counts.sum(1)
        starts = sizes.cumsum(0) - sizes
        pos = torch.arange(eb.numel(), device=x.device) - starts[group]
        longest = int(sizes.max())
        seq = x.new_zeros(sizes.shape[0], longest, d).index_put((group, pos), entries)
        if layout == "rows":
            key_valid = torch.arange(longest, device=x.device)[None, :] < sizes[:, None]
            attn_mask = key_valid[:, None, None, :]
        else:  # same cluster may attend; padding (-1) only sees padding, so no row is empty
            cid = torch.full((b, longest), -1, device=x.device).index_put((group, pos), ek)
            attn_mask = (cid[:, :, None] == cid[:, None, :])[:, None]
        for block in self.blocks:
            seq = block(seq, attn_mask)
        out = seq[group, pos] * m[:, None]  # masked average pooling weighted by M
        flat = eb * k + ek
        num = x.new_zeros(b * k, d).index_add(0, flat, out)
        den = x.new_zeros(b * k).index_add(0, flat, m)
        den = torch.where(den > 0, den, torch.ones_like(den))
        tokens = (num / den[:, None]).view(b, k, d)
        return self._finish(tokens, keep)

    def _cheaper_layout(self, counts: torch.Tensor, keep: torch.Tensor) -> str:
        """Estimated block FLOPs of both packings: per token (4 + 2 mlp) D² + 2 L D."""
        d = self.dim
        mlp = self.blocks[0].mlp[0].out_features
        rows, row_len = int(keep.sum()), int(counts.max())
        images, image_len = counts.shape[0], int(counts.sum(1).max())

        def cost(groups: int, length: int) -> int:
            return groups * length * (4 * d * d + 2 * d * mlp + 2 * length * d)

        return "rows" if cost(rows, row_len) <= cost(images, image_len) else "image"

    # ------------------------------------------------------------------ reference
    def forward_loop(
        self, x: torch.Tensor, masks: torch.Tensor, cluster_valid: torch.Tensor
    ) -> torch.Tensor:
        """Per-image, per-cluster reference with the same math (tests and benchmarks)."""
        b, h, w, k = self._check(x, masks, cluster_valid)
        feats, inp = self._inputs(x)
        weights = masks.to(x.dtype) * cluster_valid[..., None].to(x.dtype)
        out = []
        for bi in range(b):
            row = []
            for ki in range(k):
                wts = masks[bi, ki].to(x.dtype)
                idx = (wts > 0).nonzero().squeeze(1)
                if not bool(cluster_valid[bi, ki]) or idx.numel() == 0:
                    row.append(x.new_zeros(self.out_dim))
                    continue
                m = wts[idx]
                if self.enabled:
                    rows = inp[bi, idx]
                    if self.relative_pe:
                        one = torch.full_like(idx, bi), torch.full_like(idx, ki)
                        rows = rows + self._offsets(h, w, weights, *one, idx)
                    seq = (rows * m[:, None])[None]
                    for block in self.blocks:
                        seq = block(seq)
                    y = seq[0]
                else:
                    y = feats[bi, idx]
                u = (y * m[:, None]).sum(0) / m.sum()
                row.append(self.proj(u) if self.proj is not None else u)
            out.append(torch.stack(row))
        return torch.stack(out)
