"""SeTok clustering: density-peak seed scores and Algorithm 1 (paper Section 2.1, Appendix C).

Pure functions on padded batches (the dataclasses below are the contract). Images carry
their own token counts through `valid` (B, N) bool; every step is batched over images and
the only Python loop is the at most `max_clusters - 1` stick-breaking steps.

The default dynamic mechanism is content-adaptive (no fixed kernel width): a token may seed a
cluster only if it is a density-peak centre, i.e. its nearest denser token is more than
CENTRE_RATIO times farther than its own k nearest neighbours (the decision-graph rule of
density-peak clustering, scale-free); each seed's kernel exp(-beta d2) halves at
BANDWIDTH_FRACTION of the squared distance to the nearest other centre, so the next object's
peak keeps 7/8 of its scope; an image stops when its next seed would not be a centre.

Distances are squared Euclidean, computed once per batch in fp32 as
||a||² + ||b||² - 2ab (clamped at 0, exact zero diagonal). Seeds are chosen without
gradients; the masks are differentiable in `x` through the alpha kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from setok_tokenizer.config import ASSIGNMENTS

STOPS = ("dynamic", "fixed")
LN2 = math.log(2.0)
# The adaptive kernel (kernel_scale=None with stop="dynamic"); chosen on planted-group scenes,
# see benchmarks/bench_token_count.py and the package README.
CENTRE_RATIO = 2.0
BANDWIDTH_FRACTION = 1.0 / 3.0


@dataclass
class DensityPeakScores:
    """Per-token density-peak quantities, each (B, N) fp32 and 0 at padded positions.

    knn_d2 is the mean squared distance to the knn_k nearest others (rho = exp(-knn_d2)),
    kept apart from rho because exp underflows for unnormalised features. d2 is the (B, N, N) fp32 distance matrix the scores were computed from (columns of padded
    tokens are +inf), kept only when asked for, so `semantic_clustering` can reuse it.
    """

    rho: Tensor
    delta: Tensor
    score: Tensor
    knn_d2: Tensor | None = None
    d2: Tensor | None = None

    def without_d2(self) -> DensityPeakScores:
        """The same scores without the (B, N, N) distance matrix (cheap to keep around)."""
        return DensityPeakScores(self.rho, self.delta, self.score, self.knn_d2)


@dataclass
class ClusterOutput:
    """Clusters of a padded batch; K is the padded cluster count (max_clusters for Algorithm 1).

    masks (B, K, N) fp32; cluster_valid (B, K) bool, valid clusters first; num_clusters (B,)
    long; seeds (B, K) long token index of each cluster's seed, -1 for the rest-of-scope
    cluster, for invalid slots and for mechanisms without seeds. scores: the density-peak
    scores when the mechanism computed them (None otherwise).
    """

    masks: Tensor
    cluster_valid: Tensor
    num_clusters: Tensor
    seeds: Tensor
    scores: DensityPeakScores | None = None


# ----------------------------------------------------------------------------- validation
def check_features(x: Tensor, valid: Tensor | None, name: str = "x") -> tuple[Tensor, bool]:
    """Validate (B, N, D) features and the (B, N) valid mask; returns (valid, has_padding).

    Padded tokens may hold any value (they never reach a result); valid tokens must be finite.
    """
    if not isinstance(x, Tensor) or x.ndim != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B, N, D) tensor, got shape {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    b, n, d = x.shape
    if b == 0 or n == 0 or d == 0:
        raise ValueError(f"{name} must have B, N, D >= 1, got shape {tuple(x.shape)}")
    valid = check_valid(valid, b, n, x.device)
    has_padding = not bool(valid.all())
    # A finite per-token sum proves the token finite; only if one is not (non-finite values or
    # an overflowing sum) run the exact, much slower, element-wise check.
    suspect = ~torch.isfinite(x.sum(dim=-1))
    if has_padding:
        suspect &= valid
    if bool(suspect.any()):
        bad = ~torch.isfinite(x).all(dim=-1) & valid
        bad_images = bad.any(dim=1)
        if bool(bad_images.any()):
            index = int(bad_images.nonzero()[0, 0])
            raise ValueError(f"{name} has non-finite values at batch index {index}")
    return valid, has_padding


def check_valid(valid: Tensor | None, b: int, n: int, device: torch.device) -> Tensor:
    """The (B, N) bool valid mask (all True when None); every image needs a valid token."""
    if valid is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool or valid.shape != (b, n):
        got = (tuple(valid.shape), valid.dtype) if isinstance(valid, Tensor) else type(valid)
        raise ValueError(f"valid must be a bool tensor of shape ({b}, {n}), got {got}")
    empty = ~valid.any(dim=1)
    if bool(empty.any()):
        raise ValueError(f"valid[{int(empty.nonzero()[0, 0])}] has no valid token")
    return valid.to(device)


def check_scores(score: Tensor, valid: Tensor, name: str = "score") -> None:
    """score must be (B, N) and finite at valid tokens."""
    if not isinstance(score, Tensor) or score.shape != valid.shape:
        shape = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
        raise ValueError(f"{name} must have shape {tuple(valid.shape)}, got {shape}")
    bad = (~torch.isfinite(score) & valid).any(dim=1)
    if bool(bad.any()):
        raise ValueError(f"{name} has non-finite values at batch index {int(bad.nonzero()[0, 0])}")


def check_int(value: object, name: str, minimum: int) -> int:
    """value must be a plain int >= minimum (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


# ----------------------------------------------------------------------------- distances
@torch.no_grad()
def pairwise_sq_dists(x: Tensor) -> Tensor:
    """(B, N, D) -> (B, N, N) fp32 squared distances, exactly symmetric with a zero diagonal.

    Not differentiable (gradients flow through the alpha kernel, see semantic_clustering).
    """
    return _sq_dists_with_workspace(x)[0]


def _sq_dists_with_workspace(x: Tensor) -> tuple[Tensor, Tensor]:
    """Squared distances plus a spare (B, N, N) fp32 buffer (the Gram matrix's storage).

    One batched matmul G, then h = sq_i - G_ij in place and d2 = h + hᵀ, i.e.
    d2_ij = (sq_i - G_ij) + (sq_j - G_ji): the same two terms for (i, j) and (j, i), so d2 is
    symmetric bit for bit (equal density ties stay ties) and d2_ii = 0 exactly (sq_i = G_ii).
    Fresh large allocations are costly on CPU, so callers reuse the returned buffer.
    """
    x = x.float()
    gram = torch.bmm(x, x.transpose(1, 2))
    sq = gram.diagonal(dim1=1, dim2=2).clone()
    half = torch.sub(sq[:, :, None], gram, out=gram)
    d2 = torch.add(half, half.transpose(1, 2)).clamp_(min=0.0)
    return d2, half


def _lane_width(n: int) -> int:
    """n rounded up to a multiple of 64: rows this wide never hit a kernel's scalar tail."""
    return -(-n // 64) * 64


def _rowwise(fn: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """fn(z) for an element-wise transcendental fn, computed the same way for every element.

    Vectorised kernels finish a buffer's last few elements with a scalar routine that may
    differ in the last bit; padding rows to whole vector lanes makes the result independent
    of the batch around a row (so batched equals per-image, bit for bit).
    """
    n = z.shape[-1]
    width = _lane_width(n)
    if width == n:
        return fn(z.contiguous())
    buf = z.new_zeros(*z.shape[:-1], width)
    buf[..., :n] = z
    return fn(buf)[..., :n]


def sq_dists_to(x: Tensor, index: Tensor) -> Tensor:
    """Differentiable squared distances from the tokens at `index` (B, T) to all (B, T, N)."""
    centres = x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))
    sq = torch.linalg.vector_norm(x, dim=-1).square()
    sq_c = sq.gather(1, index)
    d2 = torch.baddbmm(sq_c[:, :, None] + sq[:, None, :], centres, x.transpose(1, 2), alpha=-2.0)
    return d2.clamp(min=0.0)


# ----------------------------------------------------------------------------- scores
def density_peak_scores(
    x: Tensor, knn_k: int, valid: Tensor | None = None, *, keep_d2: bool = False
) -> DensityPeakScores:
    """rho, delta and score = rho * delta of every token (paper Eq. 1-2, Appendix C).

    rho_i = exp(-mean d2 to the knn_k nearest valid j != i) (all valid others if fewer, 1.0 if
    none); delta_i = min d2 to a valid j with rho_j > rho_i, else the max d2 to any valid j.
    keep_d2=True returns the distance matrix too (for `semantic_clustering(d2=...)`).
    Scores carry no gradient: they only choose seeds.
    """
    valid, has_padding = check_features(x, valid)
    knn_k = check_int(knn_k, "knn_k", 1)
    n = x.shape[1]
    with torch.no_grad():
        d2, workspace = _sq_dists_with_workspace(x)
        pad_columns = ~valid[:, None, :]
        if has_padding:
            d2.masked_fill_(pad_columns, 0.0)  # 0 never wins the max below
        d2_max = d2.amax(dim=-1)
        if has_padding:
            d2.masked_fill_(pad_columns, math.inf)  # inf never wins a min

        # The knn_k + 1 smallest entries of row i are its own 0 plus the knn_k nearest others.
        nearest = d2.topk(min(knn_k + 1, n), dim=-1, largest=False).values
        if has_padding:
            nearest = nearest.masked_fill(torch.isinf(nearest), 0.0)
        count = (valid.sum(dim=1) - 1).clamp(max=knn_k)  # (B,)
        mean = nearest.sum(dim=-1) / count.clamp(min=1)[:, None].to(nearest.dtype)
        mean = torch.where(count[:, None] > 0, mean, 0.0)
        rho = torch.where(count[:, None] > 0, _rowwise(torch.exp, -mean), 1.0)
        rho = torch.where(valid, rho, torch.zeros_like(rho))

        rho_cmp = rho.masked_fill(~valid, -math.inf) if has_padding else rho
        higher = rho_cmp[:, None, :] > rho_cmp[:, :, None]  # [b, i, j]: rho_j > rho_i
        inf = torch.full((), math.inf, device=d2.device)
        d2_min = torch.where(higher, d2, inf, out=workspace).amin(dim=-1)
        del higher, workspace
        delta = torch.where(torch.isinf(d2_min), d2_max, d2_min)
        delta = torch.where(valid, delta, torch.zeros_like(delta))
        score = rho * delta
        knn_d2 = torch.where(valid, mean, torch.zeros_like(mean))
    return DensityPeakScores(
        rho=rho, delta=delta, score=score, knn_d2=knn_d2, d2=d2 if keep_d2 else None
    )


# ----------------------------------------------------------------------------- Algorithm 1
def density_peak_centres(
    scores: DensityPeakScores, d2: Tensor, valid: Tensor, max_seeds: int
) -> Tensor:
    """(B, N) bool: the tokens that may seed a cluster under the adaptive kernel.

    A centre's nearest denser token is more than CENTRE_RATIO times farther (squared) than its
    mean squared distance to its knn_k nearest neighbours: a peak of its own, not a slope of
    another's (the decision graph of density-peak clustering). The image's top-score token is
    always one. Equally dense twins both pass that test (delta only counts strictly denser
    tokens), so a candidate within CENTRE_RATIO x its knn radius of a better-ranked one is
    dropped. At most max_seeds per image, highest scores first (lowest index on ties).
    """
    if scores.knn_d2 is None:
        raise ValueError("the adaptive kernel needs DensityPeakScores with knn_d2")
    with torch.no_grad():
        b, n = valid.shape
        score = torch.where(valid, scores.score.float(), -math.inf)
        radius = CENTRE_RATIO * scores.knn_d2.float()
        candidate = (scores.delta.float() > radius) & valid
        candidate.scatter_(1, score.argmax(dim=1, keepdim=True), True)
        # candidates in rank order (score desc, index asc), then the C x C suppression test
        c = int(candidate.sum(dim=1).max())
        order = torch.sort(
            torch.where(candidate, score, -math.inf), dim=1, descending=True, stable=True
        )
        index = order.indices[:, :c]
        is_candidate = candidate.gather(1, index)
        rows = d2.gather(1, index[:, :, None].expand(-1, -1, n))
        between = rows.gather(2, index[:, None, :].expand(-1, c, -1))  # [b, i, j]
        better = torch.ones(c, c, dtype=torch.bool, device=d2.device).tril(-1)  # j ranks above i
        near = between <= radius.gather(1, index)[:, :, None]
        shadowed = (near & better & is_candidate[:, None, :]).any(dim=-1)
        keep = is_candidate & ~shadowed
        keep &= keep.long().cumsum(dim=1) <= max_seeds
        return torch.zeros(b, n, dtype=torch.bool, device=d2.device).scatter_(1, index, keep)


def seed_bandwidths(d2: Tensor, centres: Tensor, valid: Tensor) -> Tensor:
    """(B, N) squared distance h at which a seed's kernel exp(-ln2 d2 / h) falls to 1/2.

    h = BANDWIDTH_FRACTION x the squared distance to the nearest other centre, so that centre
    keeps 1 - 2^-3 of its scope; an image's only centre gets its farthest valid token (one
    cluster). Only the centres' values are used; others are 1.
    """
    with torch.no_grad():
        b, n = centres.shape
        k = int(centres.sum(dim=1).max())
        index = torch.sort(centres.long(), dim=1, descending=True, stable=True).indices[:, :k]
        is_centre = centres.gather(1, index)  # (B, k), centres first
        rows = d2.gather(1, index[:, :, None].expand(-1, -1, n))  # (B, k, N)
        between = rows.gather(2, index[:, None, :].expand(-1, k, -1))  # (B, k, k)
        others = is_centre[:, None, :] & ~torch.eye(k, dtype=torch.bool, device=d2.device)
        nearest = torch.where(others, between, math.inf).amin(dim=-1)
        farthest = torch.where(valid[:, None, :], rows, 0.0).amax(dim=-1)
        h = torch.where(torch.isinf(nearest), farthest, BANDWIDTH_FRACTION * nearest)
        h = torch.where(is_centre, h.clamp(min=torch.finfo(torch.float32).tiny), 1.0)
        return torch.ones(b, n, device=d2.device).scatter_(1, index, h)


def semantic_clustering(
    x: Tensor,
    score: Tensor | DensityPeakScores,
    max_clusters: int,
    *,
    valid: Tensor | None = None,
    kernel_scale: float | None = None,
    min_scope: float = 0.05,
    assignment: str = "soft",
    stop: str = "dynamic",
    straight_through: bool = True,
    d2: Tensor | None = None,
) -> ClusterOutput:
    """Algorithm 1 with density-peak seeds: at most max_clusters clusters per image.

    score: the `DensityPeakScores` of x, or a bare (B, N) score tensor when the kernel is
    fixed (an explicit kernel_scale, or stop="fixed"). Scope starts at valid; each step picks
    the valid token maximising score * scope (lowest index on ties), alpha = exp(-beta
    d2[seed]), mask = scope * alpha, scope *= 1 - alpha; the remaining scope is the last
    cluster (seed -1). The kernel:
      - kernel_scale given: beta = kernel_scale for every seed (reproduces earlier runs);
      - stop="fixed" without it: beta = max_clusters * ln 2;
      - stop="dynamic" without it (the default): adaptive, beta = ln 2 / h per seed from
        `seed_bandwidths`, and an image also stops when its next seed is not one of its
        `density_peak_centres`.
    stop="dynamic" stops an image once sum(scope) <= min_scope * sum(valid) while the others
    continue; stop="fixed" always makes max_clusters clusters. assignment="hard" gives one-hot
    masks (argmax cluster, lowest on ties), drops empty clusters and compacts the rest;
    straight_through=True keeps the soft masks' gradient under the hard forward values.
    d2: the matrix from `density_peak_scores(..., keep_d2=True)`, to avoid recomputing it.
    """
    valid, has_padding = check_features(x, valid)
    scores = score if isinstance(score, DensityPeakScores) else None
    score = scores.score if scores is not None else score
    check_scores(score, valid)
    k = check_int(max_clusters, "max_clusters", 2)
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {assignment!r}")
    if stop not in STOPS:
        raise ValueError(f"stop must be one of {STOPS}, got {stop!r}")
    if not 0.0 <= float(min_scope) <= 1.0:
        raise ValueError(f"min_scope must be in [0, 1], got {min_scope!r}")
    if kernel_scale is not None and not (math.isfinite(kernel_scale) and kernel_scale > 0):
        raise ValueError(f"kernel_scale must be a finite number > 0 or None, got {kernel_scale!r}")
    adaptive = kernel_scale is None and stop == "dynamic"
    if adaptive and (scores is None or scores.knn_d2 is None):
        raise ValueError(
            "the adaptive kernel (stop='dynamic', kernel_scale=None) needs the "
            "DensityPeakScores of x (from density_peak_scores), not a bare score tensor; "
            "pass them, or give an explicit kernel_scale"
        )
    b, n, _ = x.shape
    if d2 is not None and (not isinstance(d2, Tensor) or d2.shape != (b, n, n)):
        shape = tuple(d2.shape) if isinstance(d2, Tensor) else type(d2).__name__
        raise ValueError(f"d2 must have shape ({b}, {n}, {n}), got {shape}")
    fixed_beta = float(kernel_scale) if kernel_scale is not None else k * LN2

    with torch.no_grad():
        if d2 is None:
            d2 = pairwise_sq_dists(x)
            if has_padding:
                d2.masked_fill_(~valid[:, None, :], math.inf)
        else:
            d2 = d2.float()
        if adaptive:
            centres = density_peak_centres(scores, d2, valid, k - 1)
            # exp(-beta d2) = exp2(-d2 / h): the per-token scale is 1 / h
            inv_h = seed_bandwidths(d2, centres, valid).reciprocal()
        else:
            centres = None
            inv_h = torch.full((b, n), fixed_beta / LN2, device=x.device)
        masks, seeds, steps = _stick_breaking(d2, score, valid, k, inv_h, centres, min_scope, stop)
        num_seeded = (seeds >= 0).sum(dim=1)

    need_grad = torch.is_grad_enabled() and x.requires_grad
    if need_grad and (assignment == "soft" or straight_through):
        masks = _differentiable_masks(x, masks, seeds, valid, num_seeded, steps, inv_h)
    num_clusters = num_seeded + 1
    cluster_valid = torch.arange(k, device=x.device)[None, :] < num_clusters[:, None]
    if assignment == "soft":
        return ClusterOutput(masks, cluster_valid, num_clusters, seeds)
    return harden(masks, cluster_valid, seeds, valid, straight_through=straight_through)


def _stick_breaking(
    d2: Tensor,
    score: Tensor,
    valid: Tensor,
    k: int,
    inv_h: Tensor,
    centres: Tensor | None,
    min_scope: float,
    stop: str,
) -> tuple[Tensor, Tensor, int]:
    """The batched loop of Algorithm 1 (no gradients): masks (B,K,N), seeds (B,K), steps run.

    alpha = exp2(-d2[seed] * inv_h[seed]); with `centres`, an image stops at its first seed
    that is not a centre. Few, in-place (B, N) ops per step: on a busy CPU each small op
    costs a thread handoff.
    """
    b, n = valid.shape
    device = valid.device
    has_padding = not bool(valid.all())
    invalid = ~valid
    validf = valid.float()
    score = torch.where(valid, score.detach().float(), 0.0)
    masks = torch.zeros(b, k, n, device=device)
    seeds = torch.full((b, k), -1, dtype=torch.long, device=device)
    scope = validf.clone()
    priority = torch.empty_like(scope)
    budget = float(min_scope) * validf.sum(dim=1)
    active = torch.ones(b, dtype=torch.bool, device=device)
    d2_rows = d2.reshape(b * n, n)  # index_select of rows is far cheaper than d2[rows, seed]
    row_offset = torch.arange(b, device=device) * n
    neg_inv_h = inv_h.neg()
    lanes = torch.zeros(b, _lane_width(n), device=device)  # see _rowwise
    alpha = lanes[:, :n]
    steps = 0
    for t in range(k - 1):
        if stop == "dynamic":
            active &= scope.sum(dim=1) > budget
            if not bool(active.any()):
                break
        torch.mul(score, scope, out=priority)
        if has_padding:
            priority.masked_fill_(invalid, -math.inf)
        seed = priority.argmax(dim=1)
        if centres is not None:
            active &= centres.gather(1, seed[:, None])[:, 0]
            if not bool(active.any()):
                break
        torch.index_select(d2_rows, 0, row_offset + seed, out=alpha)
        lanes.mul_(neg_inv_h.gather(1, seed[:, None])).exp2_()
        if has_padding:
            alpha.masked_fill_(invalid, 0.0)
        if stop == "dynamic":
            alpha.mul_(active[:, None])
            seed.masked_fill_(~active, -1)
        torch.mul(scope, alpha, out=masks[:, t])
        scope.mul_(alpha.neg_().add_(1.0))
        seeds[:, t] = seed
        steps = t + 1
    num_seeded = (seeds >= 0).sum(dim=1)
    masks[torch.arange(b, device=device), num_seeded] = scope
    return masks, seeds, steps


def _differentiable_masks(
    x: Tensor,
    masks: Tensor,
    seeds: Tensor,
    valid: Tensor,
    num_seeded: Tensor,
    steps: int,
    inv_h: Tensor,
) -> Tensor:
    """The loop's masks with the gradient of Algorithm 1 in x at the chosen seeds.

    The masks are rebuilt in one batched pass from distances recomputed from x (cumprod over
    the steps); forward values stay the loop's bit for bit (masks + (rebuilt - rebuilt.detach())).
    The kernel widths carry no gradient (like the seeds, they are chosen).
    """
    b, k, n = masks.shape
    xf = x.float()
    if not bool(valid.all()):
        xf = torch.where(valid[:, :, None], xf, 0.0)
    step_seeds = seeds[:, :steps]
    active = step_seeds >= 0
    index = step_seeds.clamp(min=0)
    scale = inv_h.gather(1, index).neg()[:, :, None]
    alpha = torch.exp2(sq_dists_to(xf, index) * scale)
    alpha = torch.where(valid[:, None, :] & active[:, :, None], alpha, 0.0)
    validf = valid.float()[:, None, :]
    scope_after = validf * torch.cumprod(1.0 - alpha, dim=1)  # (B, T, N)
    scope_before = torch.cat([validf, scope_after[:, :-1]], dim=1)
    rest = scope_after[:, -1] if steps > 0 else validf[:, 0]
    rebuilt = torch.cat([scope_before * alpha, alpha.new_zeros(b, k - steps, n)], dim=1)
    rest_slot = torch.nn.functional.one_hot(num_seeded, k).to(rebuilt.dtype)
    rebuilt = rebuilt + rest_slot[:, :, None] * rest[:, None, :]
    return masks + (rebuilt - rebuilt.detach())


def harden(
    masks: Tensor,
    cluster_valid: Tensor,
    seeds: Tensor,
    valid: Tensor,
    *,
    straight_through: bool = True,
) -> ClusterOutput:
    """Soft masks -> one-hot masks: argmax cluster per valid token (lowest index on ties).

    Empty clusters are dropped and the rest compacted in order (cumsum + scatter). With
    straight_through the forward values are one-hot and the gradient is the soft masks'.
    """
    b, k, n = masks.shape
    ranked = masks.detach().masked_fill(~cluster_valid[:, :, None], -1.0)
    winner = ranked.argmax(dim=1)  # (B, N)
    hard = torch.zeros_like(ranked).scatter_(1, winner[:, None, :], 1.0)
    hard = hard * valid[:, None, :].to(hard.dtype)
    keep = hard.sum(dim=-1) > 0  # (B, K)
    if straight_through and masks.requires_grad:
        hard = hard + (masks - masks.detach())
    # destination of every slot: kept ones in order first, then the dropped ones
    kept_rank = keep.long().cumsum(dim=1) - 1
    num_clusters = keep.sum(dim=1)
    dropped_rank = (~keep).long().cumsum(dim=1) - 1 + num_clusters[:, None]
    dest = torch.where(keep, kept_rank, dropped_rank)
    source = torch.empty_like(dest).scatter_(
        1, dest, torch.arange(k, device=masks.device).expand(b, k)
    )
    new_valid = torch.arange(k, device=masks.device)[None, :] < num_clusters[:, None]
    new_masks = hard.gather(1, source[:, :, None].expand(-1, -1, n))
    new_masks = new_masks * new_valid[:, :, None].to(new_masks.dtype)
    new_seeds = seeds.gather(1, source).masked_fill(~new_valid, -1)
    return ClusterOutput(new_masks, new_valid, num_clusters, new_seeds)
