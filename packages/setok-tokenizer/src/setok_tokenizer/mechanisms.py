"""The clustering mechanisms of the paper's Table 5 ablation, all returning `ClusterOutput`.

dynamic / fixed: Algorithm 1 (`semantic_clustering`, stop="dynamic" / "fixed");
threshold: the official code's DPC-KNN (centres by a relative score threshold, every token
to its nearest centre); resampler: fixed learnable queries with one cross-attention;
patch: no clustering, every valid patch is its own token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from setok_tokenizer.clustering import (
    LN2,
    ClusterOutput,
    check_features,
    check_int,
    check_scores,
    check_valid,
    density_peak_scores,
    semantic_clustering,
    sq_dists_to,
)
from setok_tokenizer.config import ASSIGNMENTS, MECHANISMS

# The mechanisms without parameters (the resampler is a module the caller owns).
FUNCTIONAL = tuple(m for m in MECHANISMS if m != "resampler")


def threshold_clustering(
    x: Tensor,
    score: Tensor,
    *,
    threshold: float,
    min_clusters: int,
    max_clusters: int,
    valid: Tensor | None = None,
    assignment: str = "hard",
    straight_through: bool = True,
) -> ClusterOutput:
    """DPC-KNN: centres are the valid tokens with score >= threshold * (the image's max score).

    At least min_clusters and at most max_clusters centres (highest scores first, lowest index
    on ties; never more than the image's valid tokens); each valid token joins its nearest
    centre (lowest slot on ties, a centre always its own). K = max_clusters.

    The official DPC-KNN is a hard argmin with no gradient in the masks, so an objective on
    the masks (the mask-consistency KL) could not train the encoder through it. Like
    Algorithm 1's kernel, a soft assignment gives it one: token n's weight on centre c is
    proportional to exp2(-d2(n, c) / h), h the image's mean squared distance of a token to
    its own centre (no gradient, like the centres). assignment="hard" keeps the official
    one-hot forward values, and with straight_through (and x requiring grad) takes the soft
    masks' gradient; assignment="soft" returns the soft masks.
    """
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
    valid, has_padding = check_features(x, valid)
    check_scores(score, valid)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    min_clusters = check_int(min_clusters, "min_clusters", 1)
    max_clusters = check_int(max_clusters, "max_clusters", 1)
    if min_clusters > max_clusters:
        raise ValueError(f"min_clusters={min_clusters} must be <= max_clusters={max_clusters}")
    b, n, d = x.shape
    device = x.device
    with torch.no_grad():
        s = torch.where(valid, score.float(), -math.inf)
        top = s.amax(dim=1, keepdim=True)
        above = (s >= threshold * top) & valid
        count = above.sum(dim=1).clamp(min=min_clusters, max=max_clusters)
        count = torch.minimum(count, valid.sum(dim=1))
        slots = min(max_clusters, n)
        centres = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :slots]
        slot_ok = torch.arange(slots, device=device)[None, :] < count[:, None]
        xf = torch.where(valid[:, :, None], x.float(), 0.0) if has_padding else x.float()
        dist = sq_dists_to(xf, centres).masked_fill_(~slot_ok[:, :, None], math.inf)
        owner = dist.argmin(dim=1)  # (B, N), first slot on ties
        own_slot = torch.arange(slots, device=device).expand(b, slots)
        owner.scatter_(1, centres, torch.where(slot_ok, own_slot, owner.gather(1, centres)))
        masks = torch.zeros(b, max_clusters, n, device=device)
        masks.scatter_(1, owner[:, None, :], 1.0)
        masks.mul_(valid[:, None, :])
        seeds = torch.full((b, max_clusters), -1, dtype=torch.long, device=device)
        seeds[:, :slots] = centres.masked_fill(~slot_ok, -1)
        cluster_valid = torch.arange(max_clusters, device=device)[None, :] < count[:, None]
        own = dist.gather(1, owner[:, None, :])[:, 0].masked_fill(~valid, 0.0)  # (B, N)
        inv_h = valid.sum(1).clamp(min=1) / own.sum(1).clamp(min=1e-12)  # 1 / mean
    need_grad = torch.is_grad_enabled() and x.requires_grad
    if assignment == "soft" or (need_grad and straight_through):
        xg = torch.where(valid[:, :, None], x.float(), 0.0) if has_padding else x.float()
        logits = sq_dists_to(xg, centres) * (-LN2 * inv_h[:, None, None])
        logits = logits.masked_fill(~slot_ok[:, :, None], -1e30)
        soft = torch.softmax(logits, dim=1) * (valid[:, None, :] & slot_ok[:, :, None])
        soft = torch.cat([soft, soft.new_zeros(b, max_clusters - slots, n)], dim=1)
        masks = soft if assignment == "soft" else masks + (soft - soft.detach())
    return ClusterOutput(masks, cluster_valid, count, seeds)


class Resampler(nn.Module):
    """Fixed learnable queries attending once over the valid tokens (Table 5, "resampler").

    forward returns the query outputs (B, K, D) and a ClusterOutput whose masks are the
    head-averaged attention weights (each row sums to 1 over the valid tokens).
    """

    def __init__(self, dim: int, num_queries: int, num_heads: int = 2) -> None:
        super().__init__()
        check_int(dim, "dim", 1)
        check_int(num_queries, "num_queries", 1)
        check_int(num_heads, "num_heads", 1)
        if dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.dim = dim
        self.queries = nn.Parameter(torch.empty(num_queries, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> tuple[Tensor, ClusterOutput]:
        valid, has_padding = check_features(x, valid)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have feature size {self.dim}, got {x.shape[-1]}")
        b = x.shape[0]
        if has_padding:
            x = torch.where(valid[:, :, None], x, 0.0)
        queries = self.queries.to(x.dtype)[None].expand(b, -1, -1)
        out, weights = self.attn(
            queries,
            x,
            x,
            key_padding_mask=~valid if has_padding else None,
            need_weights=True,
            average_attn_weights=True,
        )
        k = self.queries.shape[0]
        clusters = ClusterOutput(
            masks=weights.float(),
            cluster_valid=torch.ones(b, k, dtype=torch.bool, device=x.device),
            num_clusters=torch.full((b,), k, dtype=torch.long, device=x.device),
            seeds=torch.full((b, k), -1, dtype=torch.long, device=x.device),
        )
        return out, clusters


def patch_clustering(valid: Tensor) -> ClusterOutput:
    """No clustering: each valid patch its own cluster (K = N), valid ones first in order."""
    if not isinstance(valid, Tensor) or valid.ndim != 2:
        raise ValueError(
            f"valid must be a (B, N) bool tensor, got {getattr(valid, 'shape', valid)}"
        )
    b, n = valid.shape
    valid = check_valid(valid, b, n, valid.device)
    count = valid.sum(dim=1)
    # slot of every valid token: its rank among the valid tokens (cumsum), then scatter
    rank = valid.long().cumsum(dim=1) - 1
    slot_ok = torch.arange(n, device=valid.device)[None, :] < count[:, None]
    token = torch.arange(n, device=valid.device).expand(b, n)
    seeds = torch.full((b, n), -1, dtype=torch.long, device=valid.device)
    seeds.scatter_(1, torch.where(valid, rank, n - 1), torch.where(valid, token, -1))
    seeds = seeds.masked_fill(~slot_ok, -1)
    masks = torch.zeros(b, n, n, device=valid.device)
    masks.scatter_(2, seeds.clamp(min=0)[:, :, None], 1.0)
    masks.mul_(slot_ok[:, :, None])
    return ClusterOutput(masks, slot_ok, count, seeds)


def cluster_features(
    x: Tensor,
    mechanism: str,
    *,
    max_clusters: int = 32,
    knn_k: int = 5,
    assignment: str = "hard",
    kernel_scale: float | None = None,
    min_scope: float = 0.05,
    threshold: float = 0.1,
    min_clusters: int = 2,
    valid: Tensor | None = None,
    straight_through: bool = True,
) -> ClusterOutput:
    """Cluster (B, N, D) features with a named mechanism: dynamic | fixed | threshold | patch.

    The resampler has parameters, so it is a module (`Resampler`) the caller owns. For the
    density-peak mechanisms the distance matrix is computed once and shared, and the scores
    come back in `ClusterOutput.scores` (without the matrix).
    """
    if mechanism not in FUNCTIONAL:
        hint = " (the resampler is the Resampler module)" if mechanism == "resampler" else ""
        raise ValueError(f"mechanism must be one of {FUNCTIONAL}{hint}, got {mechanism!r}")
    if mechanism == "patch":
        valid, _ = check_features(x, valid)
        return patch_clustering(valid)
    keep_d2 = mechanism != "threshold"
    scores = density_peak_scores(x, knn_k, valid, keep_d2=keep_d2)
    light = scores.without_d2()
    if mechanism == "threshold":
        out = threshold_clustering(
            x,
            scores.score,
            threshold=threshold,
            min_clusters=min_clusters,
            max_clusters=max_clusters,
            valid=valid,
            assignment=assignment,
            straight_through=straight_through,
        )
    else:
        out = semantic_clustering(
            x,
            scores,
            max_clusters,
            valid=valid,
            kernel_scale=kernel_scale,
            min_scope=min_scope,
            assignment=assignment,
            stop=mechanism,
            straight_through=straight_through,
            d2=scores.d2,
        )
    out.scores = light
    return out
