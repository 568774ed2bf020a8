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

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from setok_decoders.losses import mask_consistency_kl, resize_masks
from setok_tokenizer import SeTok, SeTokConfig
from setok_tokenizer.setok import config_from_dict
from setokim.data.config import DataConfig

_DEFAULT_TOKENIZER: dict[str, Any] = {
    "encoder": {"family": "vit", "preset": "tiny", "image_size": 64, "freeze": False},
    "clustering": {"mechanism": "dynamic", "assignment": "soft", "max_clusters": 8},
    "merger": {"num_blocks": 1, "num_heads": 2},
}
_DEFAULT_DATA: dict[str, Any] = {"shard_dir": "data/shapes_world_quickstart", "task": "caption"}


@dataclass
class QuickstartConfig:
    """tokenizer / data: SeTokConfig / DataConfig as nested mappings (Hydra interpolations);
    a partial mapping overrides the defaults below, key by key.

    data.batch_size is ignored: the trainer's micro_batch_size decides. generate_*: the
    dataset written when data.shard_dir has none.
    """

    tokenizer: dict[str, Any] = field(default_factory=lambda: dict(_DEFAULT_TOKENIZER))
    data: dict[str, Any] = field(default_factory=lambda: dict(_DEFAULT_DATA))
    generate_if_missing: bool = True
    generate_train: int = 256
    generate_image_size: int = 64
    generate_seed: int = 0
    kl_eps: float = 1e-6
    background: bool = True


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


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _tokenizer_config(spec: Mapping[str, Any] | SeTokConfig) -> SeTokConfig:
    """A full SeTokConfig is used as is; a partial mapping overrides the quickstart default."""
    if isinstance(spec, SeTokConfig):
        return spec
    return config_from_dict(_deep_merge(_DEFAULT_TOKENIZER, spec))


def _data_config(spec: Mapping[str, Any] | DataConfig) -> DataConfig:
    if isinstance(spec, DataConfig):
        return spec
    spec = {**_DEFAULT_DATA, **spec}
    known = {f.name for f in fields(DataConfig)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"quickstart stage: unknown data key(s) {unknown}; known: {sorted(known)}")
    return DataConfig(**dict(spec))


def ensure_dataset(
    shard_dir: str | os.PathLike[str], *, train: int, image_size: int, seed: int
) -> Path:
    """Generate a Shapes World dataset into `shard_dir` unless it has a manifest already.

    Written to a sibling temp dir and renamed, so concurrent jobs or a kill never leave a
    half-written dataset behind (the loser of a race discards its copy).
    """
    from setokim.data import generate_dataset

    target = Path(shard_dir)
    if (target / "manifest.json").is_file():
        return target
    if target.exists() and any(target.iterdir()):
        raise FileNotFoundError(
            f"data.shard_dir: {target} exists but has no manifest.json; not overwriting it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        generate_dataset(tmp, train=train, val=8, test=8, image_size=image_size, seed=seed)
        if target.exists():
            target.rmdir()  # empty (checked above)
        os.rename(tmp, target)
    except OSError:
        if not (target / "manifest.json").is_file():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


class QuickstartStage:
    """Stage protocol implementation (see setokim.train.stage.Stage)."""

    def __init__(self, cfg: QuickstartConfig) -> None:
        self.cfg = cfg
        self.tokenizer_cfg = _tokenizer_config(cfg.tokenizer)
        self.data_cfg = _data_config(cfg.data)
        if self.tokenizer_cfg.encoder.freeze:
            raise ValueError(
                "quickstart stage: tokenizer.encoder.freeze must be false — the mask-consistency "
                "loss trains the encoder and nothing else"
            )
        if self.tokenizer_cfg.clustering.mechanism == "patch":
            raise ValueError(
                "quickstart stage: tokenizer.clustering.mechanism 'patch' has no cluster masks "
                "to train (every patch is its own token)"
            )

    def build_model(self) -> nn.Module:
        model = QuickstartModel(SeTok.from_config(self.tokenizer_cfg))
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
        return [p for p in model.parameters() if p.requires_grad]

    def _prepare_data(self, rank: int) -> None:
        shard_dir = Path(self.data_cfg.shard_dir)
        if rank == 0 and not (shard_dir / "manifest.json").is_file():
            if not self.cfg.generate_if_missing:
                raise FileNotFoundError(
                    f"data.shard_dir: no manifest.json in {shard_dir} and generate_if_missing=false"
                )
            ensure_dataset(
                shard_dir,
                train=self.cfg.generate_train,
                image_size=self.cfg.generate_image_size,
                seed=self.cfg.generate_seed,
            )
        if dist.is_initialized():
            dist.barrier()

    def batches(
        self, rank: int, world_size: int, start_step: int, micro_batch_size: int
    ) -> Iterator[dict[str, Tensor]]:
        """Endless epochs of full micro-batches; the last partial batch of an epoch is dropped.

        Position p (micro-batches done on this rank) -> epoch p // per_epoch, and the loader
        skips (p % per_epoch) * micro_batch_size samples of that epoch.
        """
        from setokim.data import make_loader

        self._prepare_data(rank)
        d = self.data_cfg

        def loader(epoch: int, start_sample: int) -> Any:
            return make_loader(
                d.shard_dir, d.split, d.task, micro_batch_size, rank=rank,
                world_size=world_size, num_workers=d.num_workers, seed=d.seed, epoch=epoch,
                start_sample=start_sample, on_error=d.on_error, image_size=d.image_size,
                shuffle=d.shuffle, shuffle_buffer=d.shuffle_buffer, expand=d.expand, even=True,
            )  # fmt: skip

        per_epoch = loader(0, 0).num_samples // micro_batch_size
        if per_epoch == 0:
            raise ValueError(
                f"data: split {d.split!r} of {d.shard_dir} has fewer samples per rank than "
                f"micro_batch_size={micro_batch_size}"
            )
        epoch, within = divmod(start_step, per_epoch)
        while True:
            it = iter(loader(d.epoch + epoch, within * micro_batch_size))
            for _ in range(per_epoch - within):
                batch = next(it)
                yield {
                    "pixels": batch["pixels"],
                    "object_masks": batch["object_masks"],
                    "object_valid": batch["object_valid"],
                }
            epoch, within = epoch + 1, 0

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
        return {
            "name": "quickstart",
            "tokenizer": asdict(self.tokenizer_cfg),
            "data": asdict(self.data_cfg),
            **{k: v for k, v in asdict(self.cfg).items() if k not in ("tokenizer", "data")},
        }


def build(cfg: Mapping[str, Any]) -> QuickstartStage:
    """Registry entry: unknown keys are an error naming them."""
    known = {f.name for f in fields(QuickstartConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(
            f"quickstart stage: unknown config key(s) {unknown}; known: {sorted(known)}"
        )
    return QuickstartStage(QuickstartConfig(**dict(cfg)))
