"""The cluster merger: one token per cluster (paper Section 2.1, "Cluster Merger").

Each cluster's features are weighted by its mask and given 2D positions,
X̂ = PE(X)⊙M + X⊙M, passed through L transformer blocks whose self-attention stays inside
the cluster, and average-pooled with the mask as weights. All clusters of all images go
through each block as ONE batched attention call: only tokens with mask weight > 0 are
gathered, packed to (clusters, longest cluster, D) with a key-padding mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from setok_tokenizer.position import sincos_2d


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

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """x (R, L, D); key_valid (R, L) bool — False keys are never attended to."""
        r, length, dim = x.shape
        q, k, v = (
            self.qkv(x)
            .view(r, length, 3, self.num_heads, dim // self.num_heads)
            .permute(2, 0, 3, 1, 4)
        )
        attn_mask = None if key_valid is None else key_valid[:, None, None, :]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        a = a.transpose(1, 2).reshape(r, length, dim)
        x = self.norm1(x + self.attn_out(a))
        return self.norm2(x + self.mlp(x))


class ClusterMerger(nn.Module):
    """Merge the features of each cluster into one token.

    enabled=False is the paper's "w/o merger" ablation: the token is the mask-weighted mean
    of the raw features (no PE, no blocks). use_pe=False is "w/o PE". Invalid clusters and
    clusters with no positive mask weight give zero tokens.
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

    def _finish(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            tokens = self.proj(tokens)
        return tokens * keep[..., None].to(tokens.dtype)

    # ------------------------------------------------------------------ batched
    def forward(
        self, x: torch.Tensor, masks: torch.Tensor, cluster_valid: torch.Tensor
    ) -> torch.Tensor:
        """x (B,h,w,D), masks (B,K,N), cluster_valid (B,K) bool -> tokens (B,K,out_dim)."""
        b, h, w, k = self._check(x, masks, cluster_valid)
        n, d = h * w, self.dim
        feats, inp = self._inputs(x)
        weights = masks.to(x.dtype) * cluster_valid[..., None].to(x.dtype)
        selected = weights > 0  # (B, K, N)
        counts = selected.sum(-1)  # (B, K)
        keep = counts > 0
        if not self.enabled:
            total = weights.sum(-1, keepdim=True)
            tokens = torch.einsum("bkn,bnd->bkd", weights, feats) / total.clamp_min(1e-12)
            return self._finish(tokens, keep)

        rows = keep.nonzero()  # (R, 2): (image, cluster) of every non-empty valid cluster
        tokens = x.new_zeros(b, k, d)
        if rows.shape[0] > 0:
            bi, ki = rows[:, 0], rows[:, 1]
            row_counts = counts[bi, ki]
            longest = int(row_counts.max())
            # Stable sort puts each cluster's member positions first, in raster order.
            order = torch.argsort((~selected[bi, ki]).to(torch.int8), dim=1, stable=True)
            order = order[:, :longest]  # (R, L)
            key_valid = torch.arange(longest, device=x.device)[None, :] < row_counts[:, None]
            m = weights[bi, ki].gather(1, order) * key_valid.to(x.dtype)  # (R, L)
            seq = inp.reshape(b * n, d)[bi[:, None] * n + order] * m[..., None]
            for block in self.blocks:
                seq = block(seq, key_valid)
            pooled = (seq * m[..., None]).sum(1) / m.sum(1, keepdim=True)
            tokens = tokens.index_put((bi, ki), pooled)
        return self._finish(tokens, keep)

    # ------------------------------------------------------------------ reference
    def forward_loop(
        self, x: torch.Tensor, masks: torch.Tensor, cluster_valid: torch.Tensor
    ) -> torch.Tensor:
        """Per-image, per-cluster reference with the same math (tests and benchmarks)."""
        b, _, _, k = self._check(x, masks, cluster_valid)
        feats, inp = self._inputs(x)
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
                    seq = (inp[bi, idx] * m[:, None])[None]
                    for block in self.blocks:
                        seq = block(seq)
                    y = seq[0]
                else:
                    y = feats[bi, idx]
                u = (y * m[:, None]).sum(0) / m.sum()
                row.append(self.proj(u) if self.proj is not None else u)
            out.append(torch.stack(row))
        return torch.stack(out)
