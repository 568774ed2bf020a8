"""Config dataclasses for the SeTok tokenizer.

Plain dataclasses so that Hydra structured configs (experiments/conf) can use them as
schemas directly and a typo in an override fails at compose time with the key's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EncoderConfig:
    """Which vision encoder produces the feature grid, and how.

    family: vit | siglip | clip | dinov2 | dinov2_registers | convnext (all through
        transformers).
    preset: a named tiny/base architecture used when `pretrained_path` is None.
    pretrained_path: a local directory with a transformers checkpoint (never a download).
    image_size: the square input resolution; a pretrained ViT/SigLIP/CLIP trained at another
        size gets its position embeddings interpolated (DINOv2 always interpolates).
    layer: "last" or "penultimate" hidden state.
    overrides: extra kwargs for the transformers config (e.g. hidden_size for tests).
    """

    family: str = "vit"
    preset: str = "tiny"
    pretrained_path: str | None = None
    image_size: int = 64
    layer: str = "last"
    freeze: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClusteringConfig:
    """How the feature grid becomes clusters (paper Section 2.1, Table 5 ablations).

    mechanism: dynamic (Algorithm 1, stop="dynamic") | fixed (Algorithm 1, stop="fixed") |
        threshold (DPC-KNN of the official code) | resampler (learnable queries) |
        patch (every patch is a token).
    """

    mechanism: str = "dynamic"
    assignment: str = "hard"
    max_clusters: int = 32
    knn_k: int = 5
    kernel_scale: float | None = None
    min_scope: float = 0.05
    feature_norm: str = "l2"  # l2 | layernorm | none
    threshold: float = 0.1  # relative score threshold (mechanism=threshold)
    min_clusters: int = 2  # mechanism=threshold


@dataclass
class MergerConfig:
    """The cluster merger: L transformer blocks over each cluster, then masked mean.

    enabled=False is the paper's "w/o merger" ablation (plain masked mean);
    use_pe=False is "w/o PE".
    """

    enabled: bool = True
    use_pe: bool = True
    num_blocks: int = 2
    num_heads: int = 2
    mlp_ratio: float = 4.0
    out_dim: int | None = None  # None keeps the encoder width


@dataclass
class SeTokConfig:
    """The whole tokenizer: encoder → normalisation → clustering → merger."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    merger: MergerConfig = field(default_factory=MergerConfig)
