"""Tiny, seeded SeTokIM builds for CPU runs, tools and tests (nothing downloads)."""

from __future__ import annotations

import torch
from torch import nn

from setokim.model.config import SeTokIMConfig


def tiny_decoders(
    vision_tokenizer: nn.Module, *, image_size: int = 32, seed: int = 0
) -> tuple[nn.Module, nn.Module]:
    """A random tiny diffusion decoder and mask decoder that fit `vision_tokenizer`'s widths."""
    from setok_decoders.config import DiffusionDecoderConfig, MapperConfig, MaskDecoderConfig
    from setok_decoders.diffusion import DiffusionDecoder
    from setok_decoders.mask_decoder import MaskDecoder

    token_dim = int(vision_tokenizer.output_dim)
    feature_dim = int(vision_tokenizer.encoder.feature_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        diffusion = DiffusionDecoder(
            DiffusionDecoderConfig(
                mapper=MapperConfig(token_dim=token_dim, num_queries=4, num_layers=1),
                image_size=image_size,
                num_inference_steps=2,
                guidance_scale=1.0,
            )
        )
        mask = MaskDecoder(
            MaskDecoderConfig(token_dim=token_dim, feature_dim=feature_dim, num_layers=1)
        )
    return diffusion, mask


def build_tiny_setokim(
    cfg: SeTokIMConfig | None = None, *, with_decoders: bool = True, decoder_image_size: int = 32
):
    """SeTokIM from `cfg` (default: tiny Llama + tiny SeTok) with random tiny Stage I decoders."""
    from setokim.model.setokim import SeTokIM, build_vision_tokenizer

    cfg = cfg or SeTokIMConfig()
    vision = build_vision_tokenizer(cfg)
    image_decoder = mask_decoder = None
    if with_decoders:
        image_decoder, mask_decoder = tiny_decoders(
            vision, image_size=decoder_image_size, seed=cfg.seed
        )
    return SeTokIM.from_config(
        cfg, vision_tokenizer=vision, image_decoder=image_decoder, mask_decoder=mask_decoder
    )
