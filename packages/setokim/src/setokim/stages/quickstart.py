"""The first real objective: a tiny SeTok trained with the mask-consistency term (Eq. 4).

The tokenizer's cluster masks M over the feature grid are pulled towards Shapes World's
object masks (area-downsampled to the grid) by KL(M || stopgrad(pi)), objects matched to
clusters by Hungarian matching — `setok_decoders.losses.mask_consistency_kl`. Gradients
reach the vision encoder through the clustering kernel, so the encoder is what trains; the
merger is not part of this loss and stays frozen. Needs `encoder.freeze=False`, and soft
assignment (hard one-hot masks carry no gradient).

Data: Shapes World shards in `data.shard_dir`; when that directory has no manifest, a small
dataset is generated there first (rank 0, atomically: temp dir then rename).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from setok_decoders.losses import mask_consistency_kl, resize_masks
from setok_tokenizer import SeTok, SeTokConfig
from setok_tokenizer.config import from_dict, require
from setokim.data.config import DataConfig
from setokim.stages.common import (
    GenerateFields,
    describe_config,
    endless_batches,
    epoch_batches,
    prepare_data,
    shapes_data,
    tiny_tokenizer,
    trainable_parameters,
)


def quickstart_tokenizer() -> SeTokConfig:
    """The tiny tokenizer with a trainable encoder and soft assignment.

    The fixed kernel 8 ln 2: the KL acts through the seeds' kernels only, and on untrained
    patch-8 features the adaptive default finds 1-2 peaks that the KL cannot split
    (benchmarks/RESULTS.md, "Token count"); Stage I's grouping term is what makes peaks.
    """
    over = {"encoder": {"freeze": False},
            "clustering": {"assignment": "soft", "kernel_scale": 8 * math.log(2.0)}}  # fmt: skip
    return from_dict(SeTokConfig, over, tiny_tokenizer())


@dataclass
class QuickstartConfig(GenerateFields):
    """tokenizer / data: the experiment's groups (`${tokenizer}`, `${data}`); a partial
    mapping keeps the defaults below, key by key.

    data.batch_size is ignored: the trainer's micro_batch_size decides. generate_*: the
    dataset written when data.shard_dir has none.
    """

    tokenizer: SeTokConfig = field(default_factory=quickstart_tokenizer)
    data: DataConfig = field(
        default_factory=lambda: shapes_data("data/shapes_world_quickstart", "caption")
    )
    kl_eps: float = 1e-6
    background: bool = True

    def __post_init__(self) -> None:
        require(
            not self.tokenizer.encoder.freeze,
            self,
            "tokenizer.encoder.freeze",
            "must be false: the mask-consistency loss trains the encoder and nothing else",
        )
        require(self.tokenizer.clustering.mechanism != "patch", self,
                "tokenizer.clustering.mechanism",
                "'patch' has no cluster masks to train (every patch is its own token)")  # fmt: skip


class QuickstartModel(nn.Module):
    """SeTok up to its cluster masks; the root module, so FSDP's root hooks cover the call."""

    def __init__(self, setok: SeTok) -> None:
        super().__init__()
        self.setok = setok

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        """pixels (B,3,S,S) in [0,1] -> cluster masks (B,K,N), cluster_valid (B,K), grid."""
        setok = self.setok
        features = setok.encoder(setok.preprocess(pixels))
        b, h, w, d = features.shape
        x = features.reshape(b, h * w, d)
        if setok.resampler is not None:
            # Table 5's resampler row: its cross-attention maps are the cluster masks.
            _, out = setok.resampler(x, None)
        else:
            out, _ = setok.cluster(setok.normalise(x))
        k = max(int(out.num_clusters.max()), 1)
        return out.masks[:, :k], out.cluster_valid[:, :k], (h, w)


class QuickstartStage:
    """Stage protocol implementation (see setokim.train.stage.Stage)."""

    def __init__(self, cfg: QuickstartConfig) -> None:
        self.cfg = cfg

    def build_model(self) -> nn.Module:
        model = QuickstartModel(SeTok.from_config(self.cfg.tokenizer))
        if model.setok.merger is not None:
            model.setok.merger.requires_grad_(False)  # not in this loss
        return model

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        """The encoder's repeated blocks (ViT layers, ConvNeXt stages, ...).

        Found structurally: the ModuleList of same-typed children holding the most
        parameters, so it works across transformers families and versions.
        """
        best: list[nn.Module] = []
        best_size = 0
        for module in model.setok.encoder.modules():  # type: ignore[union-attr]
            if not isinstance(module, nn.ModuleList) or len(module) < 2:
                continue
            if len({type(child) for child in module}) != 1:
                continue
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = list(module), size
        return best

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return trainable_parameters(model)

    def epoch_batches(self, rank: int, world_size: int, micro_batch_size: int) -> int:
        """Micro-batches per rank in one epoch of `batches` (TrainerConfig.epochs)."""
        return epoch_batches(self.cfg.data, rank, world_size, micro_batch_size, self.cfg)

    def batches(
        self, rank: int, world_size: int, start_step: int, micro_batch_size: int
    ) -> Iterator[dict[str, Tensor]]:
        """`common.endless_batches` (resumable endless epochs), after the data is ready."""
        prepare_data(self.cfg.data, rank, self.cfg)
        for batch in endless_batches(self.cfg.data, rank, world_size, start_step, micro_batch_size):
            yield {
                "pixels": batch["pixels"],
                "object_masks": batch["object_masks"],
                "object_valid": batch["object_valid"],
            }

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        masks, valid, grid = model(batch["pixels"])
        objects = resize_masks(batch["object_masks"].float(), grid).flatten(2)
        loss = mask_consistency_kl(
            masks.float(),
            valid,
            objects,
            batch["object_valid"],
            eps=self.cfg.kl_eps,
            background=self.cfg.background,
        )
        metrics = {
            "clusters": float(valid.sum(1).float().mean()),
            "objects": float(batch["object_valid"].sum(1).float().mean()),
        }
        return loss, metrics

    def describe(self) -> dict[str, Any]:
        return describe_config("quickstart", self.cfg)


def build(cfg: Mapping[str, Any]) -> QuickstartStage:
    """Registry entry: unknown keys are an error naming them."""
    return QuickstartStage(from_dict(QuickstartConfig, cfg, where="quickstart"))
