"""Stage I: tokenizer pretraining with a diffusion decoder and a mask decoder (paper §2.2).

Sub-phase 1 (Eq. 3): the vision encoder is frozen; the cluster merger, the Q-Former mapper
(+ the learned null condition) and the U-Net's cross-attention keys/values train on the
eps-prediction loss of a DiffusionDecoder conditioned on the SeTok tokens.
Sub-phase 2 (Eq. 4): the mask decoder joins (tokens as queries over the encoder grid);
L = diffusion_weight * L_unet + mask_weight * (KL(M || sg(pi)) + BCE + Dice) on data with
object masks. The KL only moves the tokenizer when the cluster masks carry gradient, i.e.
when the encoder trains (`train_encoder`, default true) — hard assignment passes the soft
masks' gradient straight through.

The model always holds all three parts (tokenizer, diffusion decoder, mask decoder), so a
sub-phase-1 checkpoint initialises sub-phase 2 (`init_from`) with a strict load, and the
sub-phase only decides what trains. `subphase1_batches` runs both in one job: the first
that many micro-batches are sub-phase 1 (encoder output detached, no mask loss), the rest
sub-phase 2 (what `+exp=stage1_shapes` does on CPU). The cluster recipe runs them as two
jobs (`+exp=stage1`, then `+exp=stage1_phase2` initialised from its checkpoint).

Sub-phase 0 (ours, `subphase0_batches`): before both, the encoder alone learns to name each
object's colour and shape from its mean feature (`setok_decoders.attributes`): the tiny
stand-in for the CLIP pretraining the paper's encoders come with. `attribute_weight` keeps
that term in sub-phase 2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from setok_decoders import (
    AttributeHeads,
    DiffusionDecoder,
    MaskDecoder,
    TokenPainter,
    attribute_loss,
    mask_centroids,
    mask_loss,
    object_grouping_loss,
    object_tokens,
    resize_masks,
    set_trainable,
    trainable_table,
)
from setok_decoders.attributes import IGNORE
from setok_decoders.config import DecodersConfig
from setok_tokenizer import SeTok, SeTokConfig
from setok_tokenizer.config import from_dict, require, require_min
from setokim.data.config import DataConfig
from setokim.data.shapes_world import attribute_labels, attribute_vocab
from setokim.stages.common import (
    GenerateFields,
    endless_batches,
    epoch_batches,
    is_main,
    prepare_data,
    set_cpu_threads,
    shapes_data,
    tiny_tokenizer,
    trainable_parameters,
)

SUBPHASES = (1, 2)
WEIGHTS = ("diffusion_weight", "mask_weight", "kl_weight", "bce_weight", "dice_weight",
           "group_weight", "painter_weight", "attribute_weight",
           "token_attribute_weight")  # fmt: skip


@dataclass
class Stage1Config(GenerateFields):
    """tokenizer / decoder / data: the experiment's groups (`${tokenizer}`, `${decoder}`,
    `${data}`); a partial mapping keeps the defaults below, key by key. Decoder token/feature
    widths left None are the tokenizer's (`build_parts`).

    painter_weight: weight of the token painter's reconstruction (setok_decoders.painter,
        ours): each token paints its own layer, so the tokens must hold colour and
        silhouette. 0 (the default) builds no painter.
    subphase: 1 or 2 (what trains, see the module docstring).
    subphase0_batches: the first N micro-batches of the run are sub-phase 0 (ours, not the
        paper's): only the encoder and the attribute heads train, naming each object's colour
        and shape from its mean feature (`setok_decoders.attributes`). It stands in for the
        semantic (CLIP) pretraining the paper's encoders arrive with; a random tiny encoder
        trained by Stage I's other terms alone carries no shape (benchmarks/RESULTS.md).
    subphase1_batches: with subphase=2, the next N micro-batches are sub-phase 1.
    attribute_weight: the attribute loss's weight in sub-phase 2, so that the encoder keeps
        the names while the other terms train it. The heads exist when this or
        `subphase0_batches` is > 0; their words are `attribute_vocab(data.world)`.
    token_attribute_weight: the same names read from each object's token (the valid token
        whose cluster overlaps it best, `setok_decoders.attributes.object_tokens`) by heads
        of their own, in sub-phase 2 (ours): the merger then keeps what the encoder names.
    init_from: a checkpoint step directory of an earlier Stage I run (model weights only).
    train_encoder: sub-phase 2 trains the vision encoder (needed for the KL to act).
    group_weight: weight of `object_grouping_loss` on the encoder features in sub-phase 2 (ours,
        not the paper's): it makes each object one density peak, so the adaptive count
        follows the objects (benchmarks/bench_token_count.py). 0 turns it off.
    kl_mask_floor: added to every valid cluster's mask before the KL. Hard straight-through
        masks are exactly 0/1, where `mask_consistency_kl`'s clamp(min=0) and per-position
        renormalisation give a zero gradient; the floor keeps the KL's gradient alive.
    cpu_threads: torch.set_num_threads on CPU-only hosts (1 is fastest for the tiny U-Net).
    """

    tokenizer: SeTokConfig = field(default_factory=tiny_tokenizer)
    decoder: DecodersConfig = field(default_factory=DecodersConfig)
    data: DataConfig = field(
        default_factory=lambda: shapes_data("data/shapes_world_stage1", "image")
    )
    subphase: int = 1
    subphase0_batches: int = 0
    subphase1_batches: int = 0
    init_from: str | None = None
    train_encoder: bool = True
    diffusion_weight: float = 1.0
    mask_weight: float = 1.0
    kl_weight: float = 1.0
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    match_cost: str = "bce_dice"
    group_weight: float = 0.0
    painter_weight: float = 0.0
    attribute_weight: float = 0.0
    token_attribute_weight: float = 0.0
    kl_mask_floor: float = 1e-4
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        require(self.subphase in SUBPHASES, self, "subphase",
                f"must be one of {SUBPHASES}, got {self.subphase!r}")  # fmt: skip
        require_min(self, 0, "subphase0_batches", "subphase1_batches", *WEIGHTS, "kl_mask_floor")
        require_min(self, 1, "cpu_threads")
        require(self.subphase == 2 or not self.subphase1_batches, self, "subphase1_batches",
                "needs subphase=2")  # fmt: skip
        mechanism = self.tokenizer.clustering.mechanism
        require(self.subphase == 1 or mechanism not in ("resampler", "patch"), self,
                "tokenizer.clustering.mechanism", f"{mechanism!r} has no cluster masks for "
                "sub-phase 2")  # fmt: skip
        require(self.init_from is None or (Path(self.init_from) / "trainer_state.json").is_file(),
                self, "init_from", f"{self.init_from!r} is not a checkpoint step directory "
                "(runs/<exp>/<hash>/checkpoints/step_N with trainer_state.json)")  # fmt: skip


class Stage1Model(nn.Module):
    """Tokenizer + diffusion decoder + mask decoder (+ token painter, + attribute heads);
    forward returns the unweighted loss terms."""

    def __init__(
        self,
        setok: SeTok,
        diffusion: DiffusionDecoder,
        mask_decoder: MaskDecoder,
        painter: TokenPainter | None = None,
        attributes: AttributeHeads | None = None,
        token_attributes: AttributeHeads | None = None,
    ):
        super().__init__()
        self.setok = setok
        self.diffusion = diffusion
        self.mask_decoder = mask_decoder
        self.painter = painter
        self.attributes = attributes
        self.token_attributes = token_attributes
        self.encoder_grad = True
        self.setok.encoder.register_forward_hook(self._gate_encoder)

    def _gate_encoder(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        # Sub-phase-1 batches of a combined run: the encoder's output carries no gradient.
        return output if self.encoder_grad else output.detach()

    def forward(
        self,
        pixels: Tensor,
        object_masks: Tensor | None = None,
        object_valid: Tensor | None = None,
        *,
        with_masks: bool = False,
        encoder_grad: bool = True,
        mask_kwargs: Mapping[str, Any] | None = None,
        attribute_labels: Mapping[str, Tensor] | None = None,
        encoder_only: bool = False,
    ) -> dict[str, Tensor]:
        """pixels (B,3,S,S) in [0,1] -> {"diffusion"[, "painter"][, "mask", "kl", ...]
        [, "attributes"]}; `encoder_only` (sub-phase 0): {"attributes"} alone, from the
        encoder's features without clustering or decoders."""
        self.encoder_grad = encoder_grad
        if encoder_only:
            features = self.setok.encoder(self.setok.preprocess(pixels))
            return {"attributes": self._attribute_loss(features, object_masks, attribute_labels)}
        out = self.setok(self.setok.preprocess(pixels))
        images = resize_images(pixels, self.diffusion.config.image_size)
        terms = {"diffusion": self.diffusion.loss(images, out.tokens, out.token_mask)}
        if self.painter is not None:
            centres = mask_centroids(out.masks.float())
            painted, _ = self.painter(out.tokens, out.token_mask, centres)
            target = resize_images(pixels, self.painter.config.image_size)
            terms["painter"] = F.mse_loss(painted, target)
        if with_masks:
            if object_masks is None or object_valid is None:
                raise ValueError("sub-phase 2 needs object_masks and object_valid in the batch")
            kwargs = dict(mask_kwargs or {})
            floor = float(kwargs.pop("kl_mask_floor", 0.0))
            if not bool(object_valid.any()):
                raise ValueError(
                    "Stage I sub-phase 2: a batch without any object mask (the KL would push "
                    "every cluster towards background); train sub-phase 2 on data with masks"
                )
            b, h, w, _ = out.features.shape
            grid_objects = resize_masks(object_masks.float(), (h, w)).flatten(2)
            terms["group"] = object_grouping_loss(
                self.setok.normalise(out.features.reshape(b, h * w, -1)), grid_objects, object_valid
            )
            clusters = out.masks + floor * out.token_mask[:, :, None, None].to(out.masks.dtype)
            logits = self.mask_decoder(out.tokens, out.token_mask, out.features)
            ml = mask_loss(
                logits, out.token_mask, object_masks.float(), object_valid, clusters, **kwargs
            )
            terms.update(mask=ml.total, kl=ml.kl, bce=ml.bce, dice=ml.dice)
            if attribute_labels is not None:
                terms["attributes"] = self._attribute_loss(
                    out.features, object_masks, attribute_labels
                )
                if self.token_attributes is not None:
                    tokens = object_tokens(out.tokens, out.token_mask, out.masks, object_masks)
                    terms["token_attributes"] = attribute_loss(
                        self.token_attributes.name(tokens), attribute_labels
                    )
        return terms

    def _attribute_loss(
        self, features: Tensor, object_masks: Tensor | None, labels: Mapping[str, Tensor] | None
    ) -> Tensor:
        if self.attributes is None or object_masks is None or labels is None:
            raise ValueError(
                "the attribute loss needs the attribute heads (subphase0_batches or "
                "attribute_weight > 0), object_masks and attribute labels in the batch"
            )
        return attribute_loss(self.attributes(features, object_masks), labels)


def resize_images(pixels: Tensor, size: int) -> Tensor:
    """Area-resize (B,3,H,W) images in [0,1] to size x size (identity when already there)."""
    if tuple(pixels.shape[-2:]) == (size, size):
        return pixels.float()
    return F.interpolate(pixels.float(), size=(size, size), mode="area").clamp(0, 1)


def build_parts(
    tokenizer: SeTokConfig, decoder: DecodersConfig | Mapping[str, Any], painter: bool = False
) -> tuple[SeTok, DiffusionDecoder, MaskDecoder, TokenPainter | None]:
    """The modules (the painter only when asked); decoder token/feature widths left None
    are the tokenizer's, a width set to another value is refused."""
    decoder = from_dict(DecodersConfig, decoder, where="decoder")
    setok = SeTok.from_config(tokenizer)
    width, feat = setok.output_dim, setok.encoder.feature_dim
    mapper = _widths(decoder.diffusion.mapper, "decoder.diffusion.mapper", token_dim=width)
    diffusion = DiffusionDecoder(replace(decoder.diffusion, mapper=mapper))
    mask = _widths(decoder.mask, "decoder.mask", token_dim=width, feature_dim=feat)
    parts = setok, diffusion, MaskDecoder(mask)
    if not painter:
        return (*parts, None)
    return (*parts, TokenPainter(_widths(decoder.painter, "decoder.painter", token_dim=width)))


def _widths(cfg: Any, where: str, **widths: int) -> Any:
    """`cfg` with the tokenizer's `widths` filled in; one set to another value is refused."""
    for key, value in widths.items():
        got = getattr(cfg, key)
        if got is not None and got != value:
            raise ValueError(f"{where}.{key} must be the tokenizer's {value}, got {got}")
    return replace(cfg, **widths)


def trainable_patterns(model: Stage1Model, subphase: int, train_encoder: bool) -> list[str]:
    """Glob patterns over the model's parameter names that train in `subphase`."""
    patterns = ["diffusion." + p for p in model.diffusion.trainable_patterns()]
    if model.painter is not None:
        patterns.append("painter.*")
    for part in ("merger", "resampler", "proj"):
        module = getattr(model.setok, part, None)
        if module is not None and any(True for _ in module.parameters()):
            patterns.append(f"setok.{part}.*")
    if model.attributes is not None:
        patterns.append("attributes.*")
    if subphase == 2:
        patterns.append("mask_decoder.*")
    if train_encoder:
        patterns.append("setok.encoder.*")
    return patterns


class Stage1Stage:
    """Stage protocol implementation (see setokim.train.stage.Stage)."""

    def __init__(self, cfg: Stage1Config) -> None:
        self.cfg = cfg

    @property
    def names_attributes(self) -> bool:
        """True when the model has attribute heads (sub-phase 0 or an attribute weight)."""
        cfg = self.cfg
        return cfg.subphase0_batches > 0 or cfg.attribute_weight > 0 or self.names_tokens

    @property
    def names_tokens(self) -> bool:
        """True when sub-phase 2 also names each object from its token."""
        return self.cfg.token_attribute_weight > 0

    # ---- model ------------------------------------------------------------------------------
    def build_model(self) -> Stage1Model:
        """All parts built; sub-phase decides what trains; `init_from` weights loaded."""
        cfg = self.cfg
        set_cpu_threads(cfg.cpu_threads)
        # SeTok's encoder.freeze is overridden: the sub-phase decides what trains.
        parts = build_parts(cfg.tokenizer, cfg.decoder, painter=cfg.painter_weight > 0)
        heads = None
        if self.names_attributes:
            sizes = {k: len(v) for k, v in attribute_vocab(cfg.data.world).items()}
            heads = AttributeHeads(parts[0].encoder.feature_dim, sizes)
        token_heads = AttributeHeads(parts[0].output_dim, sizes) if self.names_tokens else None
        model = Stage1Model(*parts, attributes=heads, token_attributes=token_heads)
        if cfg.init_from:
            from setokim.train.checkpoint import load_model_state

            load_model_state(Path(cfg.init_from), model)
        self.apply_subphase(model)
        if is_main():
            print(f"Stage I sub-phase {cfg.subphase}: trainable parameters")
            print(trainable_table(model, depth=2))
        return model

    def apply_subphase(self, model: Stage1Model) -> list[str]:
        """Freeze everything but this sub-phase's parameters; return the trainable names."""
        cfg = self.cfg
        # sub-phase 0 trains the encoder; later sub-phase-1 batches cut its gradient
        train_encoder = (cfg.subphase == 2 and cfg.train_encoder) or cfg.subphase0_batches > 0
        names = set_trainable(model, trainable_patterns(model, self.cfg.subphase, train_encoder))
        model.setok.encoder.frozen = not train_encoder  # keeps a frozen encoder in eval mode
        model.setok.encoder.train(model.training)
        return names

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        """Encoder blocks, Q-Former layers and the U-Net's down/up blocks."""
        units: list[nn.Module] = []
        best: list[nn.Module] = []
        for module in model.setok.encoder.modules():  # type: ignore[union-attr]
            if isinstance(module, nn.ModuleList) and len(module) >= 2:
                if len({type(c) for c in module}) == 1 and len(module) > len(best):
                    best = list(module)
        units += best
        units += list(model.diffusion.mapper.qformer.encoder.layer)  # type: ignore[union-attr]
        unet = model.diffusion.unet  # type: ignore[union-attr]
        units += list(unet.down_blocks) + list(unet.up_blocks)
        return units

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return trainable_parameters(model)

    # ---- data -------------------------------------------------------------------------------
    def subphase_at(self, position: int) -> int:
        """The sub-phase of micro-batch `position` of this run: sub-phase 0 for the first
        `subphase0_batches`, then (with subphase=2) 1 for the next `subphase1_batches`."""
        cfg = self.cfg
        if position < cfg.subphase0_batches:
            return 0
        if cfg.subphase == 2 and position < cfg.subphase0_batches + cfg.subphase1_batches:
            return 1
        return cfg.subphase

    def epoch_batches(self, rank: int, world_size: int, micro_batch_size: int) -> int:
        """Micro-batches per rank in one epoch of `batches` (TrainerConfig.epochs)."""
        return epoch_batches(self.cfg.data, rank, world_size, micro_batch_size, self.cfg)

    def batches(
        self, rank: int, world_size: int, start_step: int, micro_batch_size: int
    ) -> Iterator[dict[str, Any]]:
        """`common.endless_batches` (resumable endless epochs), each tagged with its sub-phase."""
        prepare_data(self.cfg.data, rank, self.cfg)
        stream = endless_batches(self.cfg.data, rank, world_size, start_step, micro_batch_size)
        for position, batch in enumerate(stream, start=start_step):
            out = {
                "pixels": batch["pixels"],
                "object_masks": batch.get("object_masks"),
                "object_valid": batch.get("object_valid"),
                "subphase": self.subphase_at(position),
            }
            if self.names_attributes:
                out["attribute_labels"] = self.attribute_labels(batch)
            yield out

    def attribute_labels(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The batch's object names as per-slot word indices (`attribute_labels`), with
        slots that hold no valid object ignored."""
        masks, valid = batch.get("object_masks"), batch.get("object_valid")
        if masks is None or valid is None or "object_names" not in batch:
            raise ValueError(
                "Stage I attribute heads need object masks and names in the batch "
                f"(data.task {self.cfg.data.task!r} gives {sorted(batch)})"
            )
        labels = attribute_labels(batch["object_names"], masks.shape[1], self.cfg.data.world)
        return {
            k: torch.from_numpy(v).masked_fill(~valid.bool(), IGNORE) for k, v in labels.items()
        }

    # ---- objective --------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        phase = int(batch.get("subphase", cfg.subphase))
        labels = batch.get("attribute_labels")
        if phase == 0:
            terms = model(batch["pixels"], batch.get("object_masks"), encoder_only=True,
                          attribute_labels=labels)  # fmt: skip
            metrics = {"attributes": float(terms["attributes"].detach()), "subphase": 0.0}
            return terms["attributes"], metrics
        terms = model(
            batch["pixels"],
            batch.get("object_masks"),
            batch.get("object_valid"),
            with_masks=phase == 2,
            encoder_grad=phase == 2 and cfg.train_encoder,
            attribute_labels=labels if phase == 2 and self.names_attributes else None,
            mask_kwargs={
                "kl_weight": cfg.kl_weight,
                "bce_weight": cfg.bce_weight,
                "dice_weight": cfg.dice_weight,
                "match_cost": cfg.match_cost,
                "kl_mask_floor": cfg.kl_mask_floor,
            },
        )
        loss = cfg.diffusion_weight * terms["diffusion"]
        if "painter" in terms:
            loss = loss + cfg.painter_weight * terms["painter"]
        if phase == 2:
            loss = loss + cfg.mask_weight * terms["mask"] + cfg.group_weight * terms["group"]
        if "attributes" in terms:
            loss = loss + cfg.attribute_weight * terms["attributes"]
        if "token_attributes" in terms:
            loss = loss + cfg.token_attribute_weight * terms["token_attributes"]
        metrics = {k: float(v.detach()) for k, v in terms.items()}
        metrics["subphase"] = float(phase)
        return loss, metrics

    def export(self, checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
        """The model at `checkpoint` (a step dir) as `export_parts` (what Stage II loads)."""
        from setokim.train.checkpoint import load_model_state

        model = self.build_model()
        load_model_state(Path(checkpoint), model)
        return export_parts(model.eval(), out_dir)

    def describe(self) -> dict[str, Any]:
        """Logged into trainer.json; `params` rebuilds this stage (`load_stage1_checkpoint`)."""
        return {"name": "stage1", "params": asdict(self.cfg)}


def build(cfg: Mapping[str, Any]) -> Stage1Stage:
    """Registry entry: unknown keys are an error naming them."""
    return Stage1Stage(from_dict(Stage1Config, cfg, where="stage1"))


# ---- checkpoints ------------------------------------------------------------------------------
def _resolve_step_dir(path: Path) -> tuple[Path, Path]:
    """(run_dir, step_dir) for a run directory or one of its checkpoint step directories."""
    from setokim.train.checkpoint import latest_checkpoint

    if (path / "trainer.json").is_file():
        step = latest_checkpoint(path)
        if step is None:
            raise FileNotFoundError(f"checkpoint: run dir {path} has no checkpoint yet")
        return path, step
    run_dir = path.parent.parent
    if not (run_dir / "trainer.json").is_file():
        raise FileNotFoundError(
            f"checkpoint: {path} is neither a run dir nor a step dir of one (no trainer.json)"
        )
    return run_dir, path


def load_stage1_checkpoint(
    path: str | os.PathLike[str], **overrides: Any
) -> tuple[Stage1Stage, Stage1Model]:
    """Rebuild a Stage I run's model from its trainer.json and load a checkpoint's weights.

    `path`: the run dir (its latest checkpoint) or a step directory. `overrides` replace
    stage params (e.g. cpu_threads=1). `init_from` is dropped: the checkpoint has everything.
    """
    from setokim.train.checkpoint import load_model_state

    run_dir, step_dir = _resolve_step_dir(Path(path))
    meta = json.loads((run_dir / "trainer.json").read_text(encoding="utf-8"))
    stage_meta = meta.get("stage")
    if not isinstance(stage_meta, dict) or stage_meta.get("name") != "stage1":
        raise ValueError(f"checkpoint: {run_dir} is not a Stage I run (trainer.json stage)")
    params = {**stage_meta["params"], "init_from": None, **overrides}
    stage = build(params)
    model = stage.build_model()
    load_model_state(step_dir, model)
    return stage, model.eval()


def export_parts(model: Stage1Model, directory: str | os.PathLike[str]) -> Path:
    """Write tokenizer/, diffusion/ and mask_decoder/ (and painter/ when the model has one:
    an image decoder for Stage II's `image_decoder: painter`) with each save_pretrained."""
    out = Path(directory)
    model.setok.save_pretrained(out / "tokenizer")
    model.diffusion.save_pretrained(out / "diffusion")
    model.mask_decoder.save_pretrained(out / "mask_decoder")
    if model.painter is not None:
        model.painter.save_pretrained(out / "painter")
    return out


def load_parts(directory: str | os.PathLike[str]) -> Stage1Model:
    """Inverse of `export_parts` (no pretrained paths needed but the VAE's, if any)."""
    root = Path(directory)
    for name in ("tokenizer", "diffusion", "mask_decoder"):
        if not (root / name).is_dir():
            raise FileNotFoundError(f"directory: {root} has no {name}/ (not an export_parts dir)")
    setok = SeTok.from_pretrained(root / "tokenizer")
    painter = TokenPainter.from_pretrained(root / "painter") if (root / "painter").is_dir() else None
    model = Stage1Model(
        setok,
        DiffusionDecoder.from_pretrained(root / "diffusion"),
        MaskDecoder.from_pretrained(root / "mask_decoder"),
        painter=painter,
    )
    return model.eval()


__all__ = [
    "Stage1Config",
    "Stage1Model",
    "Stage1Stage",
    "build",
    "build_parts",
    "export_parts",
    "load_parts",
    "load_stage1_checkpoint",
    "resize_images",
    "trainable_patterns",
]
