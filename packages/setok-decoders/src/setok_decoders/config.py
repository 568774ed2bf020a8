"""Config dataclasses for the Stage I decoders.

Plain dataclasses so that Hydra structured configs can use them as schemas; the defaults
are tiny CPU models, cluster recipes override sizes and point the *_path fields at local
checkpoints (never a download).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from setok_tokenizer.config import require, require_choice, require_min

SAMPLER_NAMES = ("ddpm", "ddim", "dpm", "euler")
UNET_TRAINING = ("all", "cross_kv", "none")


def tiny_unet_kwargs(**overrides: Any) -> dict[str, Any]:
    """A pixel-space U-Net that runs a forward on the CPU in milliseconds (keys overridable)."""
    return {
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 64,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": 8,
        **overrides,
    }


@dataclass
class MapperConfig:
    """The Q-Former feature mapper: learnable queries cross-attending to the SeTok tokens.

    token_dim: width of the incoming tokens (the tokenizer's output width; None until the
        stage that builds the decoder fills it in from its tokenizer).
    cross_attention_frequency=1 puts cross-attention in every layer, so num_layers=4 is
    the paper's "four cross-attention layers".
    bert_path: a local transformers BERT directory; when set, hidden sizes come from it
    and the Q-Former's self-attention/FFN weights are initialised from its first layers.
    """

    token_dim: int | None = None
    num_queries: int = 16
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 128
    cross_attention_frequency: int = 1
    dropout: float = 0.0
    bert_path: str | None = None

    def __post_init__(self) -> None:
        require_min(self, 1, "token_dim", "num_queries", "hidden_size", "num_layers", "num_heads")
        require_min(self, 1, "intermediate_size", "cross_attention_frequency")
        require(0 <= self.dropout < 1, self, "dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class NoiseScheduleConfig:
    """DDPM training schedule (the samplers reuse it)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"  # SD 1.5: scaled_linear
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def __post_init__(self) -> None:
        require_min(self, 1, "num_train_timesteps")


@dataclass
class DiffusionDecoderConfig:
    """Q-Former mapper + U-Net (+ optional frozen VAE), eps-prediction (paper Eq. 3).

    unet: UNet2DConditionModel kwargs used when unet_path is None.
    unet_path: a local diffusers U-Net directory (or a pipeline directory with unet/).
    vae_path: a local AutoencoderKL directory (or pipeline dir with vae/); None = pixel space.
    image_size: the decoder's input/output resolution in pixels.
    cond_dropout: probability of replacing an image's condition with the learned null
        condition during training (classifier-free guidance).
    sampler: ddpm | ddim | dpm | euler, with num_inference_steps and guidance_scale.
    train_mapper / train_unet (all | cross_kv | none): what `set_trainable` unfreezes;
        the paper's sub-phase 1 is train_mapper=True, train_unet="cross_kv".
    """

    mapper: MapperConfig = field(default_factory=MapperConfig)
    unet: dict[str, Any] = field(default_factory=tiny_unet_kwargs)
    unet_path: str | None = None
    vae_path: str | None = None
    image_size: int = 32
    schedule: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    cond_dropout: float = 0.1
    sampler: str = "ddim"
    num_inference_steps: int = 25
    guidance_scale: float = 3.0
    train_mapper: bool = True
    train_unet: str = "cross_kv"

    def __post_init__(self) -> None:
        ok = 0.0 <= self.cond_dropout < 1.0
        require(ok, self, "cond_dropout", f"must be in [0, 1), got {self.cond_dropout}")
        require_choice(self, "sampler", SAMPLER_NAMES)
        require_choice(self, "train_unet", UNET_TRAINING)
        require_min(self, 1, "image_size", "num_inference_steps")


@dataclass
class MaskDecoderConfig:
    """A light Mask2Former/SAM-style mask decoder: tokens are the queries.

    feature_dim: width of the encoder feature grid; token_dim: width of the tokens (both None
        until the stage that builds the decoder fills them in from its tokenizer).
    mask_scale: the mask resolution is the feature grid times this (a power of two).
    pixel_context: the queries attend to the encoder features and the per-pixel embeddings
        are made from them (Mask2Former). False: the decoder sees only the grid's positions,
        so each mask must be drawn from its token alone, and a token that reconstructs its
        object's mask has to carry the object's position, size and shape (what Stage I asks
        of SeTok's tokens; benchmarks/study_token_content.py).
    """

    token_dim: int | None = None
    feature_dim: int | None = None
    hidden_dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    mask_scale: int = 4
    pixel_context: bool = True

    def __post_init__(self) -> None:
        require_min(self, 1, "token_dim", "feature_dim", "hidden_dim", "num_layers", "num_heads")
        scale = self.mask_scale
        ok = scale >= 1 and not scale & (scale - 1)
        require(ok, self, "mask_scale", f"must be a power of two >= 1, got {scale}")


@dataclass
class PainterConfig:
    """token_dim: the tokenizer's output width (filled in by Stage I when None).
    image_size: the side of the grid painted (the target image is resized to it).
    hidden_dim / num_layers: the per-pixel MLP.
    frequencies: Fourier features per axis (sin and cos of 2^k pi x, k < frequencies).
    centred: positions are taken relative to each token's cluster centroid (given to
        `forward`), as in invariant slot attention: the token then only has to hold its
        silhouette in its own frame, not where it lies.
    """

    token_dim: int | None = None
    image_size: int = 32
    hidden_dim: int = 64
    num_layers: int = 3
    frequencies: int = 6
    centred: bool = False

    def __post_init__(self) -> None:
        for key in ("image_size", "hidden_dim", "num_layers", "frequencies"):
            if getattr(self, key) < 1:
                raise ValueError(f"painter.{key}: must be >= 1, got {getattr(self, key)}")
        if self.token_dim is not None and self.token_dim < 1:
            raise ValueError(f"painter.token_dim: must be >= 1 or null, got {self.token_dim}")


@dataclass
class DecodersConfig:
    """The experiment's `decoder` group: Stage I's decoders (only Stage I builds them; the
    painter only with stage.params.painter_weight > 0)."""

    diffusion: DiffusionDecoderConfig = field(default_factory=DiffusionDecoderConfig)
    mask: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    painter: PainterConfig = field(default_factory=PainterConfig)
