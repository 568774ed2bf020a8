"""Plain reference of the clustering: one image, one token, one step at a time.

Written straight from the formulas (paper Eq. 1-2 and Algorithm 1, and the adaptive kernel
of `clustering`): distances as sum((a - b)²), no padding tricks, Python loops, so the
batched module can be checked against it in tests and timed against it in
benchmarks/bench_tokenizer.py. Slow by design.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from setok_tokenizer.clustering import (
    BANDWIDTH_FRACTION,
    CENTRE_RATIO,
    ClusterOutput,
    DensityPeakScores,
    pairwise_sq_dists,
)


def _valid_indices(valid: Tensor | None, b: int, n: int) -> list[int]:
    if valid is None:
        return list(range(n))
    return valid[b].nonzero().flatten().tolist()


def _distance_rows(points: Tensor, gemm: bool) -> list[Tensor]:
    """Row i holds the squared distances from token i to every token of the image."""
    if gemm:
        return list(pairwise_sq_dists(points[None])[0])
    return [((points - points[i]) ** 2).sum(dim=-1) for i in range(points.shape[0])]


@torch.no_grad()
def reference_density_peak_scores(
    x: Tensor, knn_k: int, valid: Tensor | None = None, *, gemm: bool = False
) -> DensityPeakScores:
    """rho, delta, score per image and per token (gemm=True: per-image matmul distances)."""
    b_size, n_size, _ = x.shape
    rho = torch.zeros(b_size, n_size, device=x.device)
    delta = torch.zeros(b_size, n_size, device=x.device)
    knn_d2 = torch.zeros(b_size, n_size, device=x.device)
    for b in range(b_size):
        index = _valid_indices(valid, b, n_size)
        points = x[b, index].float()
        rows = _distance_rows(points, gemm)
        n = len(index)
        rho_b: list[float] = []
        for i in range(n):
            others = torch.cat([rows[i][:i], rows[i][i + 1 :]])
            if others.numel() == 0:
                rho_b.append(1.0)
            else:
                nearest = torch.sort(others).values[:knn_k]
                knn_d2[b, index[i]] = nearest.mean()
                rho_b.append(float(torch.exp(-nearest.mean())))
        rho_t = torch.tensor(rho_b, device=x.device)
        for i in range(n):
            higher = rho_t > rho_t[i]
            d = rows[i][higher].min() if bool(higher.any()) else rows[i].max()
            rho[b, index[i]] = rho_t[i]
            delta[b, index[i]] = d
    return DensityPeakScores(rho=rho, delta=delta, score=rho * delta, knn_d2=knn_d2)


@torch.no_grad()
def reference_semantic_clustering(
    x: Tensor,
    score: Tensor | DensityPeakScores,
    max_clusters: int,
    *,
    valid: Tensor | None = None,
    kernel_scale: float | None = None,
    min_scope: float = 0.05,
    assignment: str = "soft",
    stop: str = "dynamic",
    gemm: bool = False,
) -> ClusterOutput:
    """Algorithm 1 image by image, step by step; same output layout as the batched one.

    With stop="dynamic" and no kernel_scale the kernel is adaptive: only density-peak centres
    (delta > CENTRE_RATIO * knn_d2, or the top score; at most max_clusters - 1, best first)
    may seed, each with beta = ln 2 / (BANDWIDTH_FRACTION * squared distance to the nearest
    other centre), or ln 2 / (its farthest token) when it is the only one.
    """
    b_size, n_size, _ = x.shape
    k_size = max_clusters
    adaptive = kernel_scale is None and stop == "dynamic"
    scores = score if isinstance(score, DensityPeakScores) else None
    if scores is not None:
        score = scores.score
    if adaptive and scores is None:
        raise ValueError("the adaptive kernel needs DensityPeakScores")
    fixed_beta = kernel_scale if kernel_scale is not None else max_clusters * math.log(2.0)
    masks = torch.zeros(b_size, k_size, n_size, device=x.device)
    seeds = torch.full((b_size, k_size), -1, dtype=torch.long, device=x.device)
    counts = torch.zeros(b_size, dtype=torch.long, device=x.device)
    for b in range(b_size):
        index = _valid_indices(valid, b, n_size)
        points = x[b, index].float()
        rows = _distance_rows(points, gemm) if gemm else None
        n = len(index)
        s = score[b, index].float()
        betas = [fixed_beta] * n
        if adaptive:
            betas = _adaptive_betas(points, s, scores, b, index, k_size - 1)
        scope = torch.ones(n, device=x.device)
        image_masks: list[Tensor] = []
        image_seeds: list[int] = []
        for _ in range(k_size - 1):
            if stop == "dynamic" and float(scope.sum()) <= min_scope * n:
                break
            priority = (s * scope).tolist()
            seed = max(range(n), key=lambda i, p=priority: (p[i], -i))
            if betas[seed] is None:
                break
            d2 = rows[seed] if rows is not None else ((points - points[seed]) ** 2).sum(dim=-1)
            alpha = torch.exp(d2 * -betas[seed])
            image_masks.append(scope * alpha)
            scope = scope * (1.0 - alpha)
            image_seeds.append(index[seed])
        image_masks.append(scope)
        image_seeds.append(-1)
        if assignment == "hard":
            image_masks, image_seeds = _reference_hard(image_masks, image_seeds)
        counts[b] = len(image_masks)
        for c, (m, s_idx) in enumerate(zip(image_masks, image_seeds, strict=True)):
            masks[b, c, index] = m
            seeds[b, c] = s_idx
    cluster_valid = torch.arange(k_size, device=x.device)[None, :] < counts[:, None]
    return ClusterOutput(masks, cluster_valid, counts, seeds)


def _adaptive_betas(
    points: Tensor, s: Tensor, scores: DensityPeakScores, b: int, index: list[int], limit: int
) -> list[float | None]:
    """beta of every token of one image under the adaptive kernel; None for non-centres."""
    n = len(index)
    delta = scores.delta[b, index].float()
    knn = scores.knn_d2[b, index].float()
    top = max(range(n), key=lambda i: (float(s[i]), -i))
    ranked = [i for i in range(n) if i == top or float(delta[i]) > CENTRE_RATIO * float(knn[i])]
    ranked = sorted(ranked, key=lambda i: (-float(s[i]), i))
    candidates = []
    for pos, i in enumerate(ranked):  # twins: dropped near a better-ranked candidate
        d2_i = ((points - points[i]) ** 2).sum(dim=-1)
        if all(float(d2_i[j]) > CENTRE_RATIO * float(knn[i]) for j in ranked[:pos]):
            candidates.append(i)
    candidates = candidates[:limit]
    betas: list[float | None] = [None] * n
    for i in candidates:
        d2_i = ((points - points[i]) ** 2).sum(dim=-1)
        others = [float(d2_i[j]) for j in candidates if j != i]
        h = BANDWIDTH_FRACTION * min(others) if others else float(d2_i.max())
        betas[i] = math.log(2.0) / max(h, torch.finfo(torch.float32).tiny)
    return betas


def _reference_hard(masks: list[Tensor], seeds: list[int]) -> tuple[list[Tensor], list[int]]:
    """Each token to its argmax cluster (first on ties); empty clusters removed."""
    n = masks[0].shape[0]
    owner = []
    for i in range(n):
        values = [float(m[i]) for m in masks]
        owner.append(max(range(len(values)), key=lambda c, v=values: (v[c], -c)))
    out_masks, out_seeds = [], []
    for c, seed in enumerate(seeds):
        members = [i for i in range(n) if owner[i] == c]
        if members:
            m = torch.zeros_like(masks[0])
            m[members] = 1.0
            out_masks.append(m)
            out_seeds.append(seed)
    return out_masks, out_seeds
