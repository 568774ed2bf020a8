"""Hungarian matching of predicted masks to target masks.

Both the mask-consistency KL (clusters vs objects) and the mask decoder's BCE + Dice
(token masks vs objects) need a one-to-one assignment between two sets of masks of
different sizes. Costs are computed batched in torch; the assignment itself is scipy's
`linear_sum_assignment`, one call per image (it is exact and runs on small K x O).
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

MASK_COSTS = ("dice", "iou", "bce", "bce_dice")


def hungarian_match(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-cost one-to-one assignment of rows to columns of `cost` (K, O).

    Returns (row_idx, col_idx), int64 tensors of length min(K, O), rows ascending.
    """
    if cost.dim() != 2:
        raise ValueError(f"cost must be 2-D (K, O), got shape {tuple(cost.shape)}")
    if cost.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=cost.device)
        return empty, empty.clone()
    values = cost.detach().float().cpu()
    if not torch.isfinite(values).all():
        raise ValueError("cost has non-finite entries")
    rows, cols = linear_sum_assignment(values.numpy())
    as_long = dict(dtype=torch.long, device=cost.device)
    return torch.as_tensor(rows, **as_long), torch.as_tensor(cols, **as_long)


def pairwise_mask_cost(
    pred: Tensor, target: Tensor, kind: str = "dice", eps: float = 1.0
) -> Tensor:
    """Cost between every predicted and every target mask, (B, K, N) x (B, O, N) -> (B, K, O).

    `pred` are probabilities in [0, 1] (not logits); `target` soft or binary masks.
    kind: dice (1 - soft Dice), iou (1 - soft IoU), bce (mean binary cross-entropy),
    bce_dice (their sum, as Mask2Former's matcher). `eps` smooths Dice/IoU ratios.
    """
    if kind not in MASK_COSTS:
        raise ValueError(f"kind must be one of {MASK_COSTS}, got {kind!r}")
    pred = pred.float()
    target = target.float()
    inter = torch.einsum("bkn,bon->bko", pred, target)
    pred_sum = pred.sum(-1)[:, :, None]
    tgt_sum = target.sum(-1)[:, None, :]
    cost = pred.new_zeros(inter.shape)
    if kind in ("dice", "bce_dice"):
        cost = cost + 1.0 - (2.0 * inter + eps) / (pred_sum + tgt_sum + eps)
    if kind == "iou":
        cost = cost + 1.0 - (inter + eps) / (pred_sum + tgt_sum - inter + eps)
    if kind in ("bce", "bce_dice"):
        p = pred.clamp(1e-6, 1 - 1e-6)
        log_p, log_not_p = p.log(), (1 - p).log()
        # sum_n -[t log p + (1 - t) log(1 - p)] as two matrix products
        bce = -(
            torch.einsum("bkn,bon->bko", log_p, target)
            + torch.einsum("bkn,bon->bko", log_not_p, 1 - target)
        )
        cost = cost + bce / pred.shape[-1]
    return cost


def _check_masks(name: str, masks: Tensor, valid: Tensor, valid_name: str) -> None:
    if masks.dim() != 3:
        raise ValueError(f"{name} must be (B, K, N), got shape {tuple(masks.shape)}")
    if valid.shape != masks.shape[:2]:
        raise ValueError(
            f"{valid_name} must have shape {tuple(masks.shape[:2])}, got {tuple(valid.shape)}"
        )


def match_masks(
    pred: Tensor,
    pred_valid: Tensor,
    target: Tensor,
    target_valid: Tensor,
    cost: str = "dice",
) -> list[tuple[Tensor, Tensor]]:
    """Match valid predicted masks (B, K, N) to valid target masks (B, O, N) per image.

    Returns one (pred_idx, tgt_idx) pair of int64 tensors per image, indexing the original
    K and O axes; their length is min(#valid preds, #valid targets) of that image.
    """
    _check_masks("pred", pred, pred_valid, "pred_valid")
    _check_masks("target", target, target_valid, "target_valid")
    if pred.shape[0] != target.shape[0] or pred.shape[-1] != target.shape[-1]:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must share B and N"
        )
    with torch.no_grad():
        costs = pairwise_mask_cost(pred.detach(), target.detach(), kind=cost)
    pred_valid = pred_valid.bool()
    target_valid = target_valid.bool()
    matches: list[tuple[Tensor, Tensor]] = []
    for b in range(pred.shape[0]):
        rows = pred_valid[b].nonzero().squeeze(-1)
        cols = target_valid[b].nonzero().squeeze(-1)
        try:
            r, c = hungarian_match(costs[b][rows][:, cols])
        except ValueError as err:
            raise ValueError(f"match_masks: batch index {b}: {err}") from err
        matches.append((rows[r], cols[c]))
    return matches
