"""Stage II / III objectives (paper Section 2.2).

total = lm_weight · CE(next text token) + regression_weight · MSE(regressed visual token).
Stage III differs only in which tokens carry labels (answers only, set by the chat template)
and in which parameters train (LoRA), so one function serves both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from setokim.model.packing import IGNORE_INDEX, Packed


def next_token_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Mean CE of logits[t-1] vs labels[t] over labelled positions; (0 with grad, 0) if none."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    count = int((shift_labels != IGNORE_INDEX).sum())
    if count == 0:
        return logits.sum() * 0.0, 0
    loss = F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=IGNORE_INDEX)
    return loss, count


@torch.no_grad()
def region_embeddings(
    tokens: Tensor, token_mask: Tensor, cluster_masks: Tensor, region_masks: Tensor
) -> Tensor:
    """The frozen SeTok token whose cluster best overlaps each target mask: (R,d).

    tokens (R,K,d), token_mask (R,K), cluster_masks (R,K,h,w) (soft or hard) of the input
    images; region_masks (R,H,W) in {0,1}. The Stage I mask decoder was trained with SeTok
    tokens as queries, so the best-IoU token is a query it turns into that object's mask.
    """
    if region_masks.dim() != 3 or region_masks.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"region_masks must be ({tokens.shape[0]},H,W), got {tuple(region_masks.shape)}"
        )
    best = best_overlap_tokens(token_mask, cluster_masks, region_masks)
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), best].detach()


def best_overlap_tokens(token_mask: Tensor, cluster_masks: Tensor, region_masks: Tensor) -> Tensor:
    """(R,) index of the valid token whose cluster has the highest IoU with each region."""
    h, w = cluster_masks.shape[-2:]
    target = F.interpolate(region_masks[:, None].float(), size=(h, w), mode="area")[:, 0]
    clusters = cluster_masks.float().clamp(0, 1)
    inter = (clusters * target[:, None]).sum((-2, -1))
    union = clusters.sum((-2, -1)) + target.sum((-2, -1))[:, None] - inter
    iou = (inter / union.clamp_min(1e-6)).masked_fill(~token_mask.bool(), -1.0)
    return iou.argmax(1)


def regression_targets(
    packed: Packed, visual_tokens: Tensor, visual_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(batch idx, position of the predicting hidden state, target token) for output images.

    The hidden state at t-1 predicts the visual token at t, so `[Img]`'s state predicts the
    first token of a generated image. Targets are detached: the tokenizer is frozen.
    """
    flat = visual_tokens[visual_mask.bool()].detach()  # (V,d) in packed order
    sel = packed.visual_output
    return packed.visual_batch[sel], packed.visual_pos[sel] - 1, flat[sel]


def embedding_regression_loss(
    hidden: Tensor,
    head: nn.Module,
    packed: Packed,
    visual_tokens: Tensor,
    visual_mask: Tensor,
) -> tuple[Tensor, int]:
    """MSE between head(hidden[t-1]) and the frozen SeTok token at t, over output images."""
    b, t, target = regression_targets(packed, visual_tokens, visual_mask)
    if target.shape[0] == 0:
        return sum(p.sum() for p in head.parameters()) * 0.0 + hidden.sum() * 0.0, 0
    pred = head(hidden[b, t])
    return F.mse_loss(pred.float(), target.float()), int(target.shape[0])


def region_contrast_loss(
    hidden: Tensor, head: nn.Module, packed: Packed, visual: object, temperature: float
) -> Tensor:
    """Cross-entropy of each regressed region embedding's cosine similarities (over
    `temperature`) to its input image's valid tokens, the best-overlapping one the target.

    The MSE pulls the prediction toward the target token; this term pushes it away from the
    image's other tokens, which is what picking a token (`segment_from: nearest_token`) needs.
    """
    regions = getattr(visual, "regions", None)
    if regions is None or regions.target.numel() == 0:
        return hidden.sum() * 0.0
    image_of = torch.arange(visual.token_mask.shape[0], device=hidden.device)
    image_of = image_of[:, None].expand_as(visual.token_mask)[visual.token_mask.bool()]
    flat = torch.nonzero(regions.is_region[image_of], as_tuple=True)[0]  # image order
    pred = head(hidden[packed.visual_batch[flat], packed.visual_pos[flat] - 1]).float()
    cos = F.cosine_similarity(regions.candidates.float(), pred[:, None], dim=-1)
    logits = (cos / temperature).masked_fill(~regions.candidate_mask.bool(), float("-inf"))
    return F.cross_entropy(logits, regions.target)


def setokim_loss(
    model: nn.Module,
    out: object,
    *,
    lm_weight: float = 1.0,
    regression_weight: float = 1.0,
    region_contrast_weight: float = 0.0,
    region_temperature: float = 0.1,
) -> tuple[Tensor, dict[str, float]]:
    """The Stage II/III loss from a `SeTokIMOutput`; metrics for logging."""
    lm, n_text = next_token_loss(out.logits, out.packed.labels)
    reg, n_vis = embedding_regression_loss(
        out.hidden, model.regression_head, out.packed, out.visual.tokens, out.visual.token_mask
    )
    total = lm_weight * lm + regression_weight * reg
    contrast = None
    if region_contrast_weight > 0:
        contrast = region_contrast_loss(
            out.hidden, model.regression_head, out.packed, out.visual, region_temperature
        )
        total = total + region_contrast_weight * contrast
    metrics = {
        "loss": float(total.detach()),
        "lm_loss": float(lm.detach()),
        "regression_loss": float(reg.detach()),
        "text_targets": float(n_text),
        "visual_targets": float(n_vis),
        "region_targets": float(getattr(out.visual, "num_regions", 0)),
    }
    if contrast is not None:
        metrics["region_contrast_loss"] = float(contrast.detach())
    return total, metrics


def stage_loss(model: nn.Module, layout: object) -> tuple[Tensor, dict[str, float]]:
    """Forward + loss with the weights from the model's config (the trainer's `loss` hook)."""
    out = model(layout)
    cfg = model.config
    return setokim_loss(
        model,
        out,
        lm_weight=cfg.lm_loss_weight,
        regression_weight=cfg.regression_loss_weight,
        region_contrast_weight=cfg.region_contrast_weight,
    )


__all__ = [
    "best_overlap_tokens",
    "embedding_regression_loss",
    "next_token_loss",
    "region_contrast_loss",
    "region_embeddings",
    "regression_targets",
    "setokim_loss",
    "stage_loss",
]
