"""Attribute heads: name each object (its colour, its shape) from the encoder's features.

Why: the paper's encoders (ViT-G/14, ConvNeXt-XXL) arrive CLIP-pretrained, so their patch
features already separate what a caption names. A tiny encoder initialised at random does
not: trained by Stage I's reconstruction alone its features carry colour but almost no
shape (benchmarks/RESULTS.md, issue 13). Pretraining it to name each object's attributes
from the mean feature over the object is the small-scale stand-in for that semantic
pretraining (Stage I's sub-phase 0, `setokim.stages.stage1`). Not the paper's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from setok_decoders.losses import resize_masks

IGNORE = -100
"""The label of an object slot without an object (skipped by the loss)."""


def object_means(features: Tensor, object_masks: Tensor) -> Tensor:
    """features (B, h, w, C) and object_masks (B, O, H, W) -> (B, O, C): each object's mean
    feature, weighted by how much of each grid cell it covers (zeros for an empty mask)."""
    if features.dim() != 4 or object_masks.dim() != 4 or features.shape[0] != object_masks.shape[0]:
        raise ValueError(
            f"features must be (B, h, w, C) and object_masks (B, O, H, W) with the same B, got "
            f"{tuple(features.shape)} and {tuple(object_masks.shape)}"
        )
    b, h, w, c = features.shape
    weights = resize_masks(object_masks.float(), (h, w)).flatten(2)  # (B, O, h*w)
    total = weights.sum(-1, keepdim=True).clamp(min=1e-6)
    return weights @ features.reshape(b, h * w, c).float() / total


class AttributeHeads(nn.Module):
    """One linear classifier per attribute over an object's mean encoder feature."""

    def __init__(self, feature_dim: int, vocab_sizes: Mapping[str, int]) -> None:
        super().__init__()
        if not vocab_sizes or min(vocab_sizes.values()) < 2:
            raise ValueError(f"vocab_sizes needs attributes with >= 2 values, got {vocab_sizes}")
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, n) for k, n in vocab_sizes.items()})

    def forward(self, features: Tensor, object_masks: Tensor) -> dict[str, Tensor]:
        """features (B, h, w, C), object_masks (B, O, H, W) -> {attribute: logits (B, O, V)}."""
        return self.name(object_means(features, object_masks))

    def name(self, vectors: Tensor) -> dict[str, Tensor]:
        """(B, O, C) one vector per object -> {attribute: logits (B, O, V)}."""
        return {name: head(vectors) for name, head in self.heads.items()}


def object_tokens(
    tokens: Tensor, token_mask: Tensor, cluster_masks: Tensor, object_masks: Tensor
) -> Tensor:
    """tokens (B, K, D), token_mask (B, K), cluster_masks (B, K, h, w), object_masks
    (B, O, H, W) -> (B, O, D): each object's token, the valid one whose cluster overlaps it
    best (intersection over union on the grid), as the token probes pick it. The choice
    carries no gradient; the token does."""
    b, k, h, w = cluster_masks.shape
    objects = resize_masks(object_masks.float(), (h, w)).flatten(2)  # (B, O, h*w)
    clusters = cluster_masks.detach().float().flatten(2) * token_mask[..., None].float()
    inter = objects @ clusters.transpose(1, 2)  # (B, O, K)
    union = objects.sum(-1)[..., None] + clusters.sum(-1)[:, None, :] - inter
    iou = (inter / union.clamp(min=1e-6)).masked_fill(~token_mask.bool()[:, None, :], -1.0)
    best = iou.argmax(-1)  # (B, O)
    return tokens.gather(1, best[..., None].expand(-1, -1, tokens.shape[-1]))


def attribute_loss(logits: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor:
    """Sum over attributes of the mean cross-entropy over objects (label `IGNORE` skipped)."""
    if set(logits) != set(labels):
        raise ValueError(f"labels name {sorted(labels)}, the heads {sorted(logits)}")
    total = next(iter(logits.values())).new_zeros(())
    for name, scores in logits.items():
        target = labels[name].to(scores.device)
        if target.shape != scores.shape[:-1]:
            raise ValueError(
                f"labels[{name!r}] must be {tuple(scores.shape[:-1])}, got {tuple(target.shape)}"
            )
        if bool((target != IGNORE).any()):
            total = total + F.cross_entropy(
                scores.flatten(0, 1), target.flatten(), ignore_index=IGNORE
            )
    return total
