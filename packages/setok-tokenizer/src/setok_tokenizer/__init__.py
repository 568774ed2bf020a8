"""setok_tokenizer: SeTok, the semantic-equivalent vision tokenizer (paper Section 2.1).

>>> from setok_tokenizer import SeTok, SeTokConfig
>>> setok = SeTok(SeTokConfig())  # a tiny seeded-random ViT; or SeTok.from_pretrained(dir)
>>> out = setok.tokenize(images)  # out.tokens (B, K, d), out.token_mask (B, K)
"""

from setok_tokenizer.clustering import (
    ClusterOutput,
    DensityPeakScores,
    density_peak_scores,
    semantic_clustering,
)
from setok_tokenizer.config import (
    ClusteringConfig,
    EncoderConfig,
    MergerConfig,
    SeTokConfig,
    from_dict,
)
from setok_tokenizer.encoders import VisionEncoder
from setok_tokenizer.mechanisms import Resampler, cluster_features
from setok_tokenizer.merger import ClusterMerger
from setok_tokenizer.position import sincos_2d
from setok_tokenizer.setok import SeTok, SeTokOutput

__all__ = [
    "ClusterMerger",
    "ClusterOutput",
    "ClusteringConfig",
    "DensityPeakScores",
    "EncoderConfig",
    "MergerConfig",
    "Resampler",
    "SeTok",
    "SeTokConfig",
    "SeTokOutput",
    "VisionEncoder",
    "cluster_features",
    "density_peak_scores",
    "from_dict",
    "semantic_clustering",
    "sincos_2d",
]
