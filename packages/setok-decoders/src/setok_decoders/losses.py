"""Stage I mask losses (paper Eq. 4): L_mask = KL(M || stopgrad(pi)) + L_bce + L_dice.

- `mask_consistency_kl` pulls the tokenizer's cluster masks M towards the object masks pi.
- `mask_loss` adds the mask decoder's BCE + Dice on Hungarian-matched (token, object) pairs.
- `object_grouping_loss` (ours, not in the paper) shapes the encoder's features so that each
  object is one density peak: the count of the adaptive clustering then follows the objects.

Background choice: pi must be a distribution over objects at every position, and object
annotations rarely cover the whole image. Every image therefore gets one extra
"background" object whose mask is `clamp(1 - sum of object masks, 0)`; it takes part in
matching like any object (when it has any mass). Overlapping object masks are renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from setok_decoders.matching import match_masks

_TINY = 1e-12


def _check_pair(masks: Tensor, valid: Tensor, name: str, valid_name: str, ndim: int) -> None:
    if masks.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(masks.shape)}")
    if valid.shape != masks.shape[:2]:
        raise ValueError(
            f"{valid_name} must have shape {tuple(masks.shape[:2])}, got {tuple(valid.shape)}"
        )


def object_distribution(
    object_masks: Tensor, object_valid: Tensor, background: bool = True
) -> tuple[Tensor, Tensor]:
    """Per-position distribution over objects, pi (B, O+1, N), and its validity (B, O+1).

    The last slot is the background object (see module docstring); with background=False
    it is all zero and invalid, and positions without any object carry no distribution.
    """
    obj = object_masks.detach().float().clamp(min=0) * object_valid[..., None].float()
    bg = (1.0 - obj.sum(1)).clamp(min=0) if background else torch.zeros_like(obj[:, 0])
    full = torch.cat([obj, bg[:, None]], dim=1)
    pi = full / full.sum(1, keepdim=True).clamp_min(_TINY)
    valid = torch.cat([object_valid.bool(), (bg.sum(-1) > 0)[:, None]], dim=1)
    return pi, valid


def mask_consistency_kl(
    cluster_masks: Tensor,
    cluster_valid: Tensor,
    object_masks: Tensor,
    object_valid: Tensor,
    eps: float = 1e-6,
    *,
    position_valid: Tensor | None = None,
    background: bool = True,
) -> Tensor:
    """KL(M || stopgrad(pi)) averaged over valid positions (paper Eq. 4, first term).

    cluster_masks (B, K, N) and object_masks (B, O, N) live on the same grid of N positions
    (resize object masks with `resize_masks` first). Clusters are matched one-to-one to
    objects (background included) by Hungarian matching on the Dice cost; each cluster's
    target is its matched object's pi (unmatched clusters: 0), smoothed by `eps` and
    renormalised over the valid clusters. M is renormalised over valid clusters per
    position. Gradient flows into `cluster_masks` only. A position counts when it is in
    `position_valid` (default: all) and some valid cluster covers it.
    """
    _check_pair(cluster_masks, cluster_valid, "cluster_masks", "cluster_valid", 3)
    _check_pair(object_masks, object_valid, "object_masks", "object_valid", 3)
    bsz, _, n = cluster_masks.shape
    if object_masks.shape[0] != bsz or object_masks.shape[-1] != n:
        raise ValueError(
            f"object_masks {tuple(object_masks.shape)} must share B and N with "
            f"cluster_masks {tuple(cluster_masks.shape)}"
        )
    if position_valid is None:
        position_valid = torch.ones(bsz, n, dtype=torch.bool, device=cluster_masks.device)
    elif position_valid.shape != (bsz, n):
        raise ValueError(
            f"position_valid must have shape {(bsz, n)}, got {tuple(position_valid.shape)}"
        )
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    cvalid = cluster_valid.bool()
    raw = cluster_masks.float()
    # Clamp in the forward pass only: hard (straight-through) masks sit exactly at 0, where
    # clamp's own gradient would cut the KL off from the tokenizer.
    m = (raw + (raw.clamp(min=0) - raw).detach()) * cvalid[..., None]
    mass = m.sum(1)  # (B, N)
    pos = position_valid.bool() & (mass > 0)
    p = m / mass.clamp_min(_TINY)[:, None] * pos[:, None]

    pi, pi_valid = object_distribution(object_masks, object_valid, background)
    pi = pi * pos[:, None]
    matches = match_masks(p.detach(), cvalid, pi, pi_valid, cost="dice")
    assign = torch.zeros(bsz, m.shape[1], pi.shape[1], device=m.device)
    for b, (rows, cols) in enumerate(matches):
        assign[b, rows, cols] = 1.0
    target = torch.einsum("bko,bon->bkn", assign, pi) + eps
    target = target * cvalid[..., None]
    target = target / target.sum(1, keepdim=True).clamp_min(_TINY)
    target = torch.where(cvalid[..., None], target, torch.ones_like(target))

    # p * log p with log clamped: finite gradient where a cluster's share is exactly 0
    kl = (p * (p.clamp_min(_TINY).log() - target.log())).sum(1)  # (B, N)
    count = pos.sum()
    if count == 0:
        return cluster_masks.sum() * 0.0
    return (kl * pos).sum() / count


def object_grouping_loss(
    features: Tensor,
    object_masks: Tensor,
    object_valid: Tensor,
    *,
    purity: float = 0.5,
    background: bool = True,
) -> Tensor:
    """Same object: cosine towards 1; different objects: cosine towards <= 0.

    features (B, N, D) on the cluster grid (any scale; compared by cosine); object_masks
    (B, O, N) area fractions on the same grid (`resize_masks`). Each position takes the
    object (background included) that covers most of it; positions covered less than
    `purity` by it (object borders) take no part. Mean of the same-object term over same-object
    pairs plus the different-object term over different-object pairs, averaged over images
    that have any such pair.

    Why: Algorithm 1's count is decided by which tokens are density peaks, which no gradient
    of the mask KL reaches; objects that are tight, mutually distant groups of features are
    exactly one peak each (measured in benchmarks/bench_token_count.py).
    """
    _check_pair(object_masks, object_valid, "object_masks", "object_valid", 3)
    if features.dim() != 3 or features.shape[:2] != (object_masks.shape[0], object_masks.shape[2]):
        raise ValueError(
            f"features must be (B, N, D) with B, N of object_masks {tuple(object_masks.shape)}, "
            f"got {tuple(features.shape)}"
        )
    pi, _ = object_distribution(object_masks, object_valid, background)
    share, label = pi.max(dim=1)  # (B, N)
    keep = share >= purity
    x = F.normalize(features.float(), dim=-1)
    cos = x @ x.transpose(1, 2)
    pair = keep[:, :, None] & keep[:, None, :]
    same = (label[:, :, None] == label[:, None, :]) & pair
    other = pair & ~same
    pull = ((1.0 - cos) * same).sum((1, 2)) / same.sum((1, 2)).clamp(min=1)
    push = (F.relu(cos) * other).sum((1, 2)) / other.sum((1, 2)).clamp(min=1)
    counted = pair.flatten(1).any(1)
    if not bool(counted.any()):
        return features.sum() * 0.0
    return ((pull + push) * counted).sum() / counted.sum()


def resize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize masks (B, O, H, W) to `size` by area averaging (soft at the borders)."""
    if masks.dim() != 4:
        raise ValueError(f"masks must be (B, O, H, W), got shape {tuple(masks.shape)}")
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks.float()
    if masks.shape[1] == 0:
        return masks.float().new_zeros(*masks.shape[:2], *size)
    return F.interpolate(masks.float(), size=tuple(size), mode="area")


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft Dice loss per mask: logits and targets (P, N) -> (P,)."""
    prob = logits.float().sigmoid()
    inter = (prob * target).sum(-1)
    return 1.0 - (2.0 * inter + smooth) / (prob.sum(-1) + target.sum(-1) + smooth)


def bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean per-pixel binary cross-entropy per mask: (P, N) -> (P,)."""
    return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").mean(-1)


@dataclass
class MaskLossOutput:
    """Each term of Eq. 4 (already weighted in `total`, unweighted here) and the pair count."""

    total: Tensor
    kl: Tensor
    bce: Tensor
    dice: Tensor
    num_matched: int


def mask_loss(
    mask_logits: Tensor,
    token_valid: Tensor,
    object_masks: Tensor,
    object_valid: Tensor,
    cluster_masks: Tensor | None = None,
    *,
    kl_weight: float = 1.0,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
    match_cost: str = "bce_dice",
    match_on: Tensor | None = None,
    eps: float = 1e-6,
) -> MaskLossOutput:
    """L_mask = kl_weight*KL(M || sg(pi)) + bce_weight*BCE + dice_weight*Dice (Eq. 4).

    mask_logits (B, K, H, W): the mask decoder's output, one map per token.
    token_valid (B, K): real tokens (= valid clusters).
    object_masks (B, O, Ho, Wo) with object_valid (B, O): resized to (H, W) for BCE/Dice
        and to the cluster grid for the KL.
    cluster_masks (B, K, h, w): the tokenizer's masks M; None skips the KL term.
    Tokens are matched to objects by Hungarian matching on `match_cost` of the predicted
    probabilities, or of `match_on` (B, K, h', w') when given: e.g. the tokenizer's cluster
    masks, so that each token is asked for the object its cluster covers from the first
    step on (a decoder that draws masks from the tokens alone starts with predictions that
    match nothing). BCE and Dice are averaged over matched pairs (zero when none).
    """
    _check_pair(mask_logits, token_valid, "mask_logits", "token_valid", 4)
    _check_pair(object_masks, object_valid, "object_masks", "object_valid", 4)
    bsz, k, h, w = mask_logits.shape
    if object_masks.shape[0] != bsz:
        raise ValueError(f"object_masks batch {object_masks.shape[0]} != mask_logits batch {bsz}")
    target = resize_masks(object_masks, (h, w)).flatten(2)
    logits = mask_logits.flatten(2)
    if match_on is None:
        probs = logits.detach().float().sigmoid()
    elif match_on.dim() != 4 or match_on.shape[:2] != (bsz, k):
        raise ValueError(
            f"match_on must be (B, K, h, w) with B={bsz}, K={k}, got {tuple(match_on.shape)}"
        )
    else:
        probs = resize_masks(match_on.detach().float(), (h, w)).flatten(2)
    matches = match_masks(probs, token_valid, target, object_valid, cost=match_cost)
    pred_rows = torch.cat([logits[b, r] for b, (r, _) in enumerate(matches)])
    tgt_rows = torch.cat([target[b, c] for b, (_, c) in enumerate(matches)])
    num_matched = int(pred_rows.shape[0])
    if num_matched > 0:
        bce = bce_loss(pred_rows, tgt_rows).mean()
        dice = dice_loss(pred_rows, tgt_rows).mean()
    else:
        bce = dice = mask_logits.sum() * 0.0

    if cluster_masks is not None:
        if cluster_masks.dim() != 4 or cluster_masks.shape[:2] != (bsz, k):
            raise ValueError(
                f"cluster_masks must be (B, K, h, w) with B={bsz}, K={k}, "
                f"got {tuple(cluster_masks.shape)}"
            )
        grid = tuple(cluster_masks.shape[-2:])
        kl = mask_consistency_kl(
            cluster_masks.flatten(2),
            token_valid,
            resize_masks(object_masks, grid).flatten(2),
            object_valid,
            eps=eps,
        )
    else:
        kl = mask_logits.new_zeros(()).float()
    total = kl_weight * kl + bce_weight * bce + dice_weight * dice
    return MaskLossOutput(total=total, kl=kl, bce=bce, dice=dice, num_matched=num_matched)
