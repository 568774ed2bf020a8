"""Vision encoders that turn pixels into a patch-feature grid (B, h, w, d).

All families come from transformers, built either from a tiny seeded preset (tests, CPU) or
from a local pretrained directory (never a hub download at run time). Class and register
tokens are dropped so that SeTok clusters only spatial features.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from setok_tokenizer import openclip
from setok_tokenizer.atomic import write_dir_atomically
from setok_tokenizer.config import EncoderConfig

_SETOK_ENCODER_JSON = "setok_encoder.json"
_PREPROCESSOR_JSON = "preprocessor_config.json"

# family -> (config class name, model class name) in transformers
_FAMILIES: dict[str, tuple[str, str]] = {
    "vit": ("ViTConfig", "ViTModel"),
    "siglip": ("SiglipVisionConfig", "SiglipVisionModel"),
    "clip": ("CLIPVisionConfig", "CLIPVisionModel"),
    "dinov2": ("Dinov2Config", "Dinov2Model"),
    "dinov2_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel"),
    "convnext": ("ConvNextConfig", "ConvNextModel"),
}
# transformers model_type -> family, to recognise a plain transformers checkpoint directory
_MODEL_TYPES = {
    "vit": "vit",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "clip": "clip",
    "clip_vision_model": "clip",
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2_registers",
    "convnext": "convnext",
}
_TINY_VIT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8
)
_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "vit": _TINY_VIT,
        "siglip": _TINY_VIT,
        "clip": _TINY_VIT,
        "dinov2": dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=8
        ),
        "dinov2_registers": dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_ratio=2,
            patch_size=8,
            num_register_tokens=2,
        ),
        # layer scale 1.0: at the default 1e-6 random tiny blocks would be near-identity
        "convnext": dict(
            num_stages=2,
            hidden_sizes=[16, 32],
            depths=[2, 2],
            patch_size=4,
            layer_scale_init_value=1.0,
        ),
    },
    # "base": the transformers defaults of each config class (ViT-B/16-like widths)
    "base": {family: {} for family in _FAMILIES},
}
# Pixel normalisation each family was trained with (overridden by a checkpoint's own
# preprocessor_config.json when there is one).
_HALF = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
_NORMALISATION = {
    "vit": _HALF,
    "siglip": _HALF,
    "clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]),
    "dinov2": _IMAGENET,
    "dinov2_registers": _IMAGENET,
    "convnext": _IMAGENET,
}
_INTERPOLATING = {"vit", "siglip", "clip"}  # fixed position tables: interpolate off-size


def _classes(family: str) -> tuple[type, type]:
    if family not in _FAMILIES:
        raise ValueError(f"encoder family must be one of {sorted(_FAMILIES)}, got {family!r}")
    config_name, model_name = _FAMILIES[family]
    return getattr(transformers, config_name), getattr(transformers, model_name)


def _build_model(family: str, config: Any) -> nn.Module:
    _, model_cls = _classes(family)
    if family == "vit":
        return model_cls(config, add_pooling_layer=False)
    return model_cls(config)


def _load_model(family: str, path: str) -> nn.Module:
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"pretrained_path must be a local directory with a transformers checkpoint: {path}"
        )
    if family == "convnext" and openclip.is_open_clip_dir(path):
        return openclip.load_open_clip_convnext(path)  # ConvNeXt-XXL's public format
    _, model_cls = _classes(family)
    kwargs = {"add_pooling_layer": False} if family == "vit" else {}
    model = model_cls.from_pretrained(path, local_files_only=True, **kwargs)
    if family == "convnext" and getattr(model.config, "norm_eps", None) is not None:
        openclip.set_norm_eps(model, float(model.config.norm_eps))  # converted from OpenCLIP
    return model


def _read_normalisation(family: str, path: str | None) -> tuple[list[float], list[float]]:
    if path is not None and family == "convnext" and openclip.is_open_clip_dir(path):
        return openclip.open_clip_normalisation(path)
    if path is not None:
        pre = Path(path) / _PREPROCESSOR_JSON
        if pre.is_file():
            data = json.loads(pre.read_text())
            if "image_mean" in data and "image_std" in data:
                return list(data["image_mean"]), list(data["image_std"])
    return _NORMALISATION[family]


class VisionEncoder(nn.Module):
    """A transformers vision model that returns the patch grid (B, h, w, d).

    `layer="last"` is the model's final output (after its final norm where it has one);
    `layer="penultimate"` is hidden_states[-2], the output of the second-to-last block
    (ConvNeXt: the second-to-last block of the last stage). `freeze=True` sets
    requires_grad False and keeps the model in eval mode even under `.train()`.
    """

    def __init__(self, cfg: EncoderConfig, hf_config: Any | None = None) -> None:
        super().__init__()
        config_cls, _ = _classes(cfg.family)
        self.cfg = cfg
        self.family = cfg.family
        if cfg.pretrained_path is not None:
            self.model = _load_model(cfg.family, cfg.pretrained_path)
        elif hf_config is not None:
            if isinstance(hf_config, dict):
                hf_config = config_cls.from_dict(hf_config)
            self.model = _build_model(cfg.family, hf_config)
        else:
            if cfg.preset not in _PRESETS:
                raise ValueError(f"preset must be one of {sorted(_PRESETS)}, got {cfg.preset!r}")
            kwargs = {**_PRESETS[cfg.preset][cfg.family], "image_size": cfg.image_size}
            kwargs.update(cfg.overrides)
            self.model = _build_model(cfg.family, config_cls(**kwargs))
        mean, std = _read_normalisation(cfg.family, cfg.pretrained_path)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1))
        if cfg.layer == "penultimate" and self._num_blocks() < 2:
            raise ValueError("layer='penultimate' needs an encoder with at least 2 blocks")
        self.frozen = cfg.freeze
        if cfg.freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    # ------------------------------------------------------------------ geometry
    @property
    def hf_config(self) -> Any:
        return self.model.config

    @property
    def image_size(self) -> int:
        """The input resolution this encoder expects (square images)."""
        return self.cfg.image_size

    @property
    def num_channels(self) -> int:
        return int(getattr(self.model.config, "num_channels", 3))

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the output grid for an image_size × image_size input."""
        c = self.model.config
        if self.family == "convnext":
            side = self.image_size // c.patch_size
            for _ in range(c.num_stages - 1):
                side //= 2
            return side, side
        side = self.image_size // c.patch_size
        return side, side

    @property
    def feature_dim(self) -> int:
        c = self.model.config
        return int(c.hidden_sizes[-1]) if self.family == "convnext" else int(c.hidden_size)

    def _num_blocks(self) -> int:
        c = self.model.config
        return int(c.depths[-1]) if self.family == "convnext" else int(c.num_hidden_layers)

    def train(self, mode: bool = True) -> VisionEncoder:
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    # ------------------------------------------------------------------ forward
    def check_pixels(self, pixels: torch.Tensor) -> None:
        """Raise a ValueError naming `pixels` (and the batch index) for unusable input."""
        if not isinstance(pixels, torch.Tensor):
            raise TypeError(f"pixels must be a torch.Tensor, got {type(pixels).__name__}")
        if pixels.ndim != 4:
            raise ValueError(f"pixels must be (B, C, H, W), got shape {tuple(pixels.shape)}")
        if pixels.shape[1] != self.num_channels:
            raise ValueError(
                f"pixels must have {self.num_channels} channels, got {pixels.shape[1]} "
                f"(shape {tuple(pixels.shape)})"
            )
        if tuple(pixels.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"pixels must be {self.image_size}x{self.image_size} (encoder image_size), "
                f"got {pixels.shape[2]}x{pixels.shape[3]}"
            )
        if not pixels.is_floating_point():
            raise ValueError(f"pixels must be a floating tensor, got {pixels.dtype}")
        finite = torch.isfinite(pixels).flatten(1).all(1)
        if not finite.all():
            raise ValueError(
                f"pixels has non-finite values (batch index {int((~finite).nonzero()[0])})"
            )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, H, W), normalised -> feature grid (B, h, w, d)."""
        self.check_pixels(pixels)
        dtype = next(self.model.parameters()).dtype
        pixels = pixels.to(dtype)
        h, w = self.grid_size
        if self.family == "convnext":
            return self._forward_convnext(pixels)
        kwargs: dict[str, Any] = {}
        if self.family in _INTERPOLATING and self.image_size != self.model.config.image_size:
            kwargs["interpolate_pos_encoding"] = True
        penultimate = self.cfg.layer == "penultimate"
        out = self.model(pixel_values=pixels, output_hidden_states=penultimate, **kwargs)
        seq = out.hidden_states[-2] if penultimate else out.last_hidden_state
        # CLS / register tokens precede the patches: keep the trailing h*w positions.
        patches = seq[:, seq.shape[1] - h * w :]
        return patches.reshape(pixels.shape[0], h, w, -1)

    def _forward_convnext(self, pixels: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = None
        if self.cfg.layer == "penultimate":
            block = self.model.encoder.stages[-1].layers[-2]
            handle = block.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            out = self.model(pixel_values=pixels)
        finally:
            if handle is not None:
                handle.remove()
        fmap = captured[-1] if captured else out.last_hidden_state  # (B, d, h, w)
        return fmap.permute(0, 2, 3, 1).contiguous()

    # ------------------------------------------------------------------ preprocessing
    def preprocess(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        """PIL images / HWC uint8 arrays / (B,3,H,W) tensors in [0,1] -> normalised pixels.

        Images are converted to RGB, resized (bilinear, antialiased) to image_size and
        normalised with the mean/std the encoder family was trained with.
        """
        if isinstance(images, torch.Tensor):
            batch = images if images.ndim == 4 else images[None]
            if batch.ndim != 4 or batch.shape[1] != 3:
                raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
            batch = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
        else:
            if len(images) == 0:
                raise ValueError("images must not be empty")
            arrays = []
            for i, img in enumerate(images):
                arr = np.asarray(img.convert("RGB")) if hasattr(img, "convert") else np.asarray(img)
                if arr.ndim == 2:
                    arr = np.repeat(arr[..., None], 3, axis=2)
                if arr.ndim != 3 or arr.shape[2] not in (3, 4):
                    raise ValueError(f"images[{i}] must be an RGB image, got shape {arr.shape}")
                t = torch.from_numpy(np.array(arr[..., :3], copy=True)).permute(2, 0, 1)
                t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
                size = (self.image_size, self.image_size)
                arrays.append(F.interpolate(t[None], size=size, mode="bilinear", antialias=True))
            batch = torch.cat(arrays)
        size = (self.image_size, self.image_size)
        if tuple(batch.shape[2:]) != size:
            batch = F.interpolate(batch, size=size, mode="bilinear", antialias=True)
        batch = batch.to(self.pixel_mean.device)
        return (batch.clamp(0, 1) - self.pixel_mean) / self.pixel_std

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """A transformers checkpoint directory plus the encoder options (atomic)."""
        options = asdict(replace(self.cfg, pretrained_path=None))

        def fill(tmp: Path) -> None:
            self.model.save_pretrained(tmp)
            (tmp / _SETOK_ENCODER_JSON).write_text(json.dumps(options, indent=2, sort_keys=True))
            pre = {
                "image_mean": self.pixel_mean.flatten().tolist(),
                "image_std": self.pixel_std.flatten().tolist(),
                "size": {"height": self.image_size, "width": self.image_size},
            }
            (tmp / _PREPROCESSOR_JSON).write_text(json.dumps(pre, indent=2, sort_keys=True))

        return write_dir_atomically(directory, fill)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], **changes: Any) -> VisionEncoder:
        """Load a directory written by save_pretrained, or a plain transformers checkpoint
        (family from its config.json); `changes` override EncoderConfig fields."""
        directory = Path(directory)
        opts_file = directory / _SETOK_ENCODER_JSON
        if opts_file.is_file():
            options = json.loads(opts_file.read_text())
        else:
            cfg_file = directory / "config.json"
            if not cfg_file.is_file():
                raise FileNotFoundError(f"no config.json in pretrained directory {directory}")
            hf = json.loads(cfg_file.read_text())
            model_type = hf.get("model_type")
            if model_type not in _MODEL_TYPES:
                raise ValueError(f"unsupported model_type {model_type!r} in {cfg_file}")
            options = {"family": _MODEL_TYPES[model_type]}
            vision = hf.get("vision_config", hf)
            if "image_size" in vision:
                options["image_size"] = int(vision["image_size"])
        known = {f.name for f in fields(EncoderConfig)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown EncoderConfig fields: {sorted(unknown)}")
        options = {k: v for k, v in options.items() if k in known}
        options.update(changes)
        options["pretrained_path"] = str(directory)
        return cls(EncoderConfig(**options))
