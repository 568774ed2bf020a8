"""The diffusion decoder: SeTok tokens -> Q-Former -> U-Net, trained by eps-prediction.

Paper Eq. 3: L_unet = E ||eps - eps_theta(z_t, t, U)||^2. z lives in an AutoencoderKL's
latent space when `vae_path` is set (SD 1.5 on a cluster) and in pixel space ([-1, 1])
for tiny CPU configs. Each image's condition is replaced by a learned null condition with
probability `cond_dropout` while training, which is what classifier-free guidance needs
at sampling time.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from setok_decoders.config import DiffusionDecoderConfig
from setok_decoders.io import load_config, load_weights, module_device, save_module
from setok_decoders.qformer import FeatureMapper
from setok_decoders.trainable import UNET_PATTERNS, set_trainable, trainable_table
from setok_tokenizer.config import from_dict

KIND = "diffusion_decoder"
SAMPLERS: dict[str, type] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}
_KEEP = object()


def _subfolder(path: str, name: str) -> str | None:
    return name if (Path(path) / name).is_dir() else None


def _build_unet(config: DiffusionDecoderConfig) -> UNet2DConditionModel:
    if config.unet_path is None:
        return UNet2DConditionModel(**config.unet)
    return UNet2DConditionModel.from_pretrained(
        config.unet_path, subfolder=_subfolder(config.unet_path, "unet"), local_files_only=True
    )


def _load_vae(path: str) -> AutoencoderKL:
    vae = AutoencoderKL.from_pretrained(
        path, subfolder=_subfolder(path, "vae"), local_files_only=True
    )
    vae.requires_grad_(False)
    return vae.eval()


def make_sampler(name: str, train_scheduler: DDPMScheduler) -> Any:
    """A fresh sampling scheduler (ddpm | ddim | dpm | euler) sharing the training betas."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name].from_config(train_scheduler.config)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


class DiffusionDecoder(nn.Module):
    """Mapper + U-Net (+ frozen VAE): `loss` for training, `decode`/`reconstruct` to sample."""

    def __init__(self, config: DiffusionDecoderConfig) -> None:
        super().__init__()
        self.unet = _build_unet(config)
        cross_dim = self.unet.config.cross_attention_dim
        self.mapper = FeatureMapper(config.mapper, out_dim=cross_dim)
        self.config = dataclasses.replace(config, mapper=self.mapper.config)
        self.null_condition = nn.Parameter(torch.zeros(1, config.mapper.num_queries, cross_dim))
        self.vae = _load_vae(config.vae_path) if config.vae_path is not None else None
        channels = self.vae.config.latent_channels if self.vae is not None else 3
        if self.unet.config.in_channels != channels or self.unet.config.out_channels != channels:
            raise ValueError(
                f"unet in/out channels ({self.unet.config.in_channels}, "
                f"{self.unet.config.out_channels}) must be {channels} "
                f"({'VAE latents' if self.vae is not None else 'RGB pixels'})"
            )
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        if config.image_size % scale:
            raise ValueError(f"image_size {config.image_size} is not divisible by {scale}")
        self.latent_shape = (channels, config.image_size // scale, config.image_size // scale)
        sched = config.schedule
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=sched.num_train_timesteps,
            beta_schedule=sched.beta_schedule,
            beta_start=sched.beta_start,
            beta_end=sched.beta_end,
            prediction_type="epsilon",
            clip_sample=self.vae is None,
        )
        self._tokenizer: nn.Module | None = None

    # ---- conditioning -------------------------------------------------------------------
    def condition(
        self,
        tokens: Tensor,
        token_mask: Tensor,
        drop_prob: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The U-Net's conditioning sequence; rows dropped to the null condition w.p. drop_prob."""
        cond = self.mapper(tokens, token_mask)
        if drop_prob > 0:
            drop = _uniform((tokens.shape[0],), generator, cond.device) < drop_prob
            null = self.null_condition.to(cond.dtype).expand_as(cond)
            cond = torch.where(drop[:, None, None], null, cond)
        return cond

    # ---- pixels <-> diffusion space -----------------------------------------------------
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, S, S) in [0, 1] -> the diffusion space (latents or [-1, 1] pixels)."""
        size = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images must be (B, 3, {size}, {size}), got {tuple(images.shape)}")
        if images.min() < -1e-3 or images.max() > 1 + 1e-3:
            raise ValueError("images must be in [0, 1]")
        x = images * 2.0 - 1.0
        if self.vae is None:
            return x
        with torch.no_grad():
            dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
            return dist.sample(generator) * self.vae.config.scaling_factor

    def to_images(self, z: Tensor) -> Tensor:
        """The diffusion space -> images in [0, 1] (float32)."""
        if self.vae is not None:
            z = self.vae.decode(z.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((z.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    # ---- training -------------------------------------------------------------------------
    def loss(
        self,
        images: Tensor,
        tokens: Tensor,
        token_mask: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Eq. 3: MSE between the sampled noise and the U-Net's prediction of it."""
        if tokens.shape[0] != images.shape[0]:
            raise ValueError(f"tokens batch {tokens.shape[0]} != images batch {images.shape[0]}")
        z0 = self.encode(images, generator)
        noise = randn_tensor(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)
        num_t = self.noise_scheduler.config.num_train_timesteps
        t = (_uniform((z0.shape[0],), generator, z0.device) * num_t).long().clamp(max=num_t - 1)
        zt = self.noise_scheduler.add_noise(z0, noise, t)
        drop = self.config.cond_dropout if self.training else 0.0
        cond = self.condition(tokens, token_mask, drop, generator)
        pred = self.unet(zt, t, encoder_hidden_states=cond.to(zt.dtype)).sample
        return F.mse_loss(pred.float(), noise.float())

    # ---- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def decode(
        self,
        tokens: Tensor,
        token_mask: Tensor,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
    ) -> Tensor:
        """Sample images (B, 3, S, S) in [0, 1] from tokens; guidance_scale 1 disables CFG."""
        steps = num_steps if num_steps is not None else self.config.num_inference_steps
        scale = guidance_scale if guidance_scale is not None else self.config.guidance_scale
        if steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {steps}")
        sched = make_sampler(sampler or self.config.sampler, self.noise_scheduler)
        device = module_device(self.unet)
        sched.set_timesteps(steps, device=device)
        cond = self.condition(tokens.to(device), token_mask.to(device))
        use_cfg = scale != 1.0
        if use_cfg:
            cond = torch.cat([self.null_condition.to(cond.dtype).expand_as(cond), cond])
        dtype = self.unet.dtype
        shape = (tokens.shape[0], *self.latent_shape)
        z = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        z = z * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = torch.cat([z, z]) if use_cfg else z
            inp = sched.scale_model_input(inp, t)
            eps = self.unet(inp, t, encoder_hidden_states=cond.to(dtype)).sample
            if use_cfg:
                uncond, cond_eps = eps.chunk(2)
                eps = uncond + scale * (cond_eps - uncond)
            z = sched.step(eps, t, z, generator=generator).prev_sample
        return self.to_images(z)

    def attach_tokenizer(self, tokenizer: nn.Module | None) -> None:
        """Hold a tokenizer for `reconstruct` without making it part of this module's state."""
        self.__dict__["_tokenizer"] = tokenizer  # plain attribute: not a registered submodule

    def reconstruct(
        self, images: Tensor, tokenizer: nn.Module | None = None, **decode_kwargs: Any
    ) -> Tensor:
        """Tokenize images (B, 3, H, W) in [0, 1] with SeTok and decode them back.

        Uses the tokenizer's `tokenize` (preprocess + forward) when it has one, else calls it.
        """
        tok = tokenizer if tokenizer is not None else self._tokenizer
        if tok is None:
            raise ValueError("reconstruct needs a tokenizer: pass tokenizer= or attach_tokenizer()")
        with torch.no_grad():
            out = tok.tokenize(images) if hasattr(tok, "tokenize") else tok(images)
        return self.decode(out.tokens, out.token_mask, **decode_kwargs)

    # ---- what trains ------------------------------------------------------------------
    def trainable_patterns(self) -> list[str]:
        """Glob patterns of the parameters that train under this config."""
        if self.config.train_unet not in UNET_PATTERNS:
            raise ValueError(
                f"train_unet must be one of {sorted(UNET_PATTERNS)}, got {self.config.train_unet!r}"
            )
        patterns = ["mapper.*", "null_condition"] if self.config.train_mapper else []
        return patterns + ["unet." + p for p in UNET_PATTERNS[self.config.train_unet]]

    def apply_trainable(self, verbose: bool = False) -> list[str]:
        """Freeze everything except `trainable_patterns()`; optionally print the table."""
        names = set_trainable(self, self.trainable_patterns())
        if verbose:
            print(trainable_table(self))
        return names

    def train(self, mode: bool = True) -> DiffusionDecoder:
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
        return self

    # ---- persistence --------------------------------------------------------------------
    def resolved_config(self) -> DiffusionDecoderConfig:
        """The config that rebuilds this architecture without any pretrained path but the VAE."""
        unet_kwargs = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}
        mapper = dataclasses.replace(self.mapper.config, bert_path=None)
        return dataclasses.replace(self.config, unet=unet_kwargs, unet_path=None, mapper=mapper)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """config.json + model.safetensors (the frozen VAE is not saved; its path is)."""
        config = dataclasses.asdict(self.resolved_config())
        return save_module(self, config, directory, KIND, exclude_prefixes=("vae.",))

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], vae_path: Any = _KEEP
    ) -> DiffusionDecoder:
        """Rebuild from `save_pretrained`; `vae_path` overrides the saved VAE location."""
        config = from_dict(DiffusionDecoderConfig, load_config(directory, KIND))
        if vae_path is not _KEEP:
            config = dataclasses.replace(config, vae_path=vae_path)
        model = cls(config)
        load_weights(model, directory, allow_missing_prefixes=("vae.",))
        return model
