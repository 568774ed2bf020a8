"""setok_decoders: the Stage I decoders (Q-Former mapper, diffusion decoder, mask decoder,
token painter) and their losses (Eq. 3-4 of the SeTok paper).

Heavy modules (diffusers, transformers) load on first attribute access, so importing the
losses alone stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MapperConfig": "config",
    "NoiseScheduleConfig": "config",
    "DiffusionDecoderConfig": "config",
    "MaskDecoderConfig": "config",
    "tiny_unet_kwargs": "config",
    "hungarian_match": "matching",
    "match_masks": "matching",
    "pairwise_mask_cost": "matching",
    "mask_consistency_kl": "losses",
    "mask_loss": "losses",
    "object_grouping_loss": "losses",
    "MaskLossOutput": "losses",
    "resize_masks": "losses",
    "dice_loss": "losses",
    "bce_loss": "losses",
    "FeatureMapper": "qformer",
    "DiffusionDecoder": "diffusion",
    "make_sampler": "diffusion",
    "MaskDecoder": "mask_decoder",
    "PainterConfig": "config",
    "TokenPainter": "painter",
    "load_image_decoder": "io",
    "mask_centroids": "painter",
    "AttributeHeads": "attributes",
    "attribute_loss": "attributes",
    "object_means": "attributes",
    "object_tokens": "attributes",
    "set_trainable": "trainable",
    "trainable_parameter_names": "trainable",
    "trainable_table": "trainable",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'setok_decoders' has no attribute {name!r}")
    return getattr(importlib.import_module(f"setok_decoders.{_EXPORTS[name]}"), name)
