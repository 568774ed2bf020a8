"""SeTok: pixels -> a variable number of semantic tokens per image (paper Section 2.1).

pixels -> VisionEncoder grid X -> feature normalisation -> density-peak scores ->
clustering (Algorithm 1, or an ablation mechanism) -> ClusterMerger -> tokens.
Variable counts are padded to the batch's largest count and carried with `token_mask`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from setok_tokenizer.atomic import write_dir_atomically
from setok_tokenizer.clustering import ClusterOutput, DensityPeakScores
from setok_tokenizer.config import SeTokConfig, from_dict
from setok_tokenizer.encoders import VisionEncoder
from setok_tokenizer.mechanisms import Resampler, cluster_features
from setok_tokenizer.merger import ClusterMerger

CONFIG_NAME = "setok_config.json"
ENCODER_CONFIG_NAME = "encoder_config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class SeTokOutput:
    """What SeTok gives per batch; K is the batch's largest token count.

    tokens (B,K,d_out), zero where token_mask is False; token_mask (B,K) bool;
    masks (B,K,h,w) cluster masks over the grid (differentiable in the features);
    num_tokens (B,) long; scores: density-peak scores (None for patch / resampler);
    features (B,h,w,d) the encoder grid; seeds (B,K) grid index of each cluster's seed
    (-1 for the remainder cluster, padding and mechanisms without seeds).
    """

    tokens: torch.Tensor
    token_mask: torch.Tensor
    masks: torch.Tensor
    num_tokens: torch.Tensor
    scores: DensityPeakScores | None
    features: torch.Tensor
    seeds: torch.Tensor


class SeTok(nn.Module):
    """The semantic-equivalent vision tokenizer."""

    def __init__(self, cfg: SeTokConfig, encoder_hf_config: Any | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionEncoder(cfg.encoder, hf_config=encoder_hf_config)
        dim = self.encoder.feature_dim
        c, m = cfg.clustering, cfg.merger
        self.resampler: Resampler | None = None
        self.merger: ClusterMerger | None = None
        self.proj: nn.Linear | None = None
        if c.mechanism == "resampler":
            self.resampler = Resampler(dim, c.max_clusters, m.num_heads)
            self.proj = nn.Linear(dim, m.out_dim) if m.out_dim is not None else None
        else:
            self.merger = ClusterMerger(
                dim,
                num_blocks=m.num_blocks,
                num_heads=m.num_heads,
                mlp_ratio=m.mlp_ratio,
                use_pe=m.use_pe,
                relative_pe=m.relative_pe,
                enabled=m.enabled,
                out_dim=m.out_dim,
            )

    @classmethod
    def from_config(cls, cfg: SeTokConfig) -> SeTok:
        return cls(cfg)

    @property
    def output_dim(self) -> int:
        if self.merger is not None:
            return self.merger.out_dim
        return self.proj.out_features if self.proj is not None else self.encoder.feature_dim

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.encoder.grid_size

    # ------------------------------------------------------------------ forward
    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """The feature normalisation the clustering distances are computed on."""
        norm = self.cfg.clustering.feature_norm
        if norm == "l2":
            return F.normalize(x, dim=-1)
        if norm == "layernorm":
            return F.layer_norm(x, x.shape[-1:])
        return x

    def cluster(self, x: torch.Tensor) -> tuple[ClusterOutput, DensityPeakScores | None]:
        """Normalised features (B, N, D) -> (clusters, density-peak scores or None).

        Not for the resampler, which is a learned module (`self.resampler`).
        """
        c = self.cfg.clustering
        if self.resampler is not None:
            raise ValueError("cluster() is not defined for mechanism='resampler'")
        out = cluster_features(
            x,
            c.mechanism,
            max_clusters=c.max_clusters,
            knn_k=c.knn_k,
            assignment=c.assignment,
            kernel_scale=c.kernel_scale,
            min_scope=c.min_scope,
            threshold=c.threshold,
            min_clusters=c.min_clusters,
        )
        return out, out.scores

    def forward(self, pixels: torch.Tensor) -> SeTokOutput:
        """pixels (B, 3, H, W), normalised as by `preprocess` -> SeTokOutput."""
        features = self.encoder(pixels)
        b, h, w, d = features.shape
        finite = torch.isfinite(features).flatten(1).all(1)
        if not finite.all():
            raise ValueError(
                f"encoder features are non-finite (batch index {int((~finite).nonzero()[0])})"
            )
        x = features.reshape(b, h * w, d)
        if self.resampler is not None:
            tokens, out = self.resampler(x, None)
        else:
            out, _ = self.cluster(self.normalise(x))
        k = max(int(out.num_clusters.max()), 1)
        masks = out.masks[:, :k]
        token_mask = out.cluster_valid[:, :k]
        if self.merger is not None:
            tokens = self.merger(features, masks, token_mask)
        else:
            tokens = tokens[:, :k]
            if self.proj is not None:
                tokens = self.proj(tokens)
            tokens = tokens * token_mask[..., None].to(tokens.dtype)
        return SeTokOutput(
            tokens=tokens,
            token_mask=token_mask,
            masks=masks.reshape(b, k, h, w),
            num_tokens=out.num_clusters,
            scores=out.scores,
            features=features,
            seeds=out.seeds[:, :k],
        )

    def preprocess(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        """PIL images (or [0,1] / uint8 tensors) -> normalised pixels for `forward`."""
        return self.encoder.preprocess(images)

    @torch.no_grad()
    def tokenize(self, images: Sequence[Any] | torch.Tensor) -> SeTokOutput:
        """Inference convenience: preprocess then forward, without gradients."""
        return self(self.preprocess(images))

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Config JSON + encoder architecture JSON + safetensors weights, written atomically."""
        cfg = replace(self.cfg, encoder=replace(self.cfg.encoder, pretrained_path=None))
        hf = self.encoder.hf_config.to_dict()

        def fill(tmp: Path) -> None:
            (tmp / CONFIG_NAME).write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True))
            (tmp / ENCODER_CONFIG_NAME).write_text(json.dumps(hf, indent=2, sort_keys=True))
            save_model(self, str(tmp / WEIGHTS_NAME))

        return write_dir_atomically(directory, fill)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], device: str = "cpu") -> SeTok:
        """Rebuild from save_pretrained's directory (no network, no encoder download)."""
        directory = Path(directory)
        for name in (CONFIG_NAME, ENCODER_CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{name} missing in SeTok checkpoint directory {directory}")
        cfg = from_dict(SeTokConfig, json.loads((directory / CONFIG_NAME).read_text()))
        hf = json.loads((directory / ENCODER_CONFIG_NAME).read_text())
        model = cls(cfg, encoder_hf_config=hf)
        missing, unexpected = load_model(model, str(directory / WEIGHTS_NAME), device=device)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {directory} does not match the model: "
                f"missing={sorted(missing)} unexpected={sorted(unexpected)}"
            )
        return model.to(device)
