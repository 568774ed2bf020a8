"""Which token stands for which object, and the vectors a probe reads for each object.

An object's token is the valid cluster with the highest IoU with the object's area on the
cluster grid; the object *owns* it when the object is also that cluster's best object (no
other object of the image shares it with a higher IoU). The encoder's vector of an object
is its area-weighted mean feature: what any tokenizer could keep of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ObjectVectors:
    """Per valid object (flattened over the batch, image order): (P, d_token), (P, d_feature),
    owned (P,) bool, iou (P,) of its token, image (P,) batch index, index (P,) object slot."""

    token: Tensor
    encoder: Tensor
    owned: Tensor
    iou: Tensor
    image: Tensor
    index: Tensor


def object_token_iou(cluster_masks: Tensor, token_mask: Tensor, object_masks: Tensor) -> Tensor:
    """(B, K, O) IoU of each cluster's (soft) mask with each object's area on the grid.

    cluster_masks (B, K, h, w); token_mask (B, K); object_masks (B, O, H, W) in {0, 1},
    area-resized to (h, w). Invalid clusters get IoU -1.
    """
    h, w = cluster_masks.shape[-2:]
    obj = F.interpolate(object_masks.float(), size=(h, w), mode="area").flatten(2)
    clu = cluster_masks.float().flatten(2) * token_mask[..., None].float()
    inter = torch.einsum("bkn,bon->bko", clu, obj)
    union = clu.sum(-1)[:, :, None] + obj.sum(-1)[:, None, :] - inter
    iou = inter / union.clamp(min=1e-9)
    return iou.masked_fill(~token_mask[:, :, None], -1.0)


@torch.no_grad()
def object_vectors(
    tokens: Tensor,
    token_mask: Tensor,
    cluster_masks: Tensor,
    features: Tensor,
    object_masks: Tensor,
    object_valid: Tensor,
) -> ObjectVectors:
    """The token and the encoder vector of every valid object, and whether it owns its token.

    tokens (B, K, d); token_mask (B, K); cluster_masks (B, K, h, w); features (B, h, w, D);
    object_masks (B, O, H, W); object_valid (B, O).
    """
    iou = object_token_iou(cluster_masks, token_mask, object_masks)  # (B, K, O)
    iou = iou.masked_fill(~object_valid[:, None, :], -1.0)
    best_token = iou.argmax(1)  # (B, O)
    best_object = iou.argmax(2)  # (B, K)
    owner = best_object.gather(1, best_token)  # (B, O): the best object of my token
    slots = torch.arange(object_masks.shape[1], device=owner.device)[None, :]
    owned = (owner == slots) & (iou.amax(1) > 0)
    h, w = features.shape[1:3]
    area = F.interpolate(object_masks.float(), size=(h, w), mode="area").flatten(2)
    mean = torch.einsum("bon,bnd->bod", area, features.flatten(1, 2).float())
    mean = mean / area.sum(-1, keepdim=True).clamp(min=1e-9)
    token = tokens.gather(1, best_token[..., None].expand(-1, -1, tokens.shape[-1]))
    image, index = object_valid.nonzero(as_tuple=True)
    return ObjectVectors(
        token=token[image, index].float(),
        encoder=mean[image, index],
        owned=owned[image, index],
        iou=iou.amax(1)[image, index],
        image=image,
        index=index,
    )
