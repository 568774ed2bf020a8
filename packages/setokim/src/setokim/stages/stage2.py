"""Stage II: multimodal pretraining of SeTokIM (paper Section 2.2, Table 7).

Loss = CE on the next text token + MSE from the regression head to the frozen Stage I
tokenizer's tokens of every image the model outputs (`setokim.model.losses.stage_loss`).
`[Img]` is a labelled text token before an output image, so the model learns where an image
starts. Data: a per-batch mix of the caption, t2i, edit and chat views in "pretrain" format
(`setokim.model.samples.batch_to_samples`). The LLM, projector and regression head train;
SeTok stays frozen.

Initialisation: `init_tokenizer` is a Stage I export (tokenizer/, diffusion/, mask_decoder/
from `stage1.export_parts`) or a bare `SeTok.save_pretrained` dir; None builds a seeded
random tiny SeTok from `tokenizer`. The trained model is exported by `export`, its config
pointing at the Stage I decoders so inference (generate, edit, segment) and Stage III can
load it: by one process with `SeTokIM.save_pretrained` (one `model.safetensors`), or, when
several ranks run, by all of them, each writing its shard (`export_sharded`).

The helpers here (`MLLMBatches`, `MLLMStage`, ...) are shared with Stage III.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from setok_tokenizer.config import SeTokConfig, from_dict, require
from setokim.data.config import DataConfig
from setokim.model.config import SeTokIMConfig
from setokim.model.packing import SequenceLayout, collate_sequences
from setokim.model.setokim import special_ids, text_tokenizer_for
from setokim.stages.common import (
    GenerateFields,
    describe_config,
    endless_batches,
    epoch_batches,
    is_main,
    prepare_data,
    set_cpu_threads,
    shapes_data,
    tiny_tokenizer,
    trainable_parameters,
)

MODES = ("pretrain", "instruct")
IMAGE_DECODERS = ("diffusion", "painter")
BatchHook = Callable[[dict[str, Any]], dict[str, Any]]


def prompt_hook(question_suffix: str, caption_prompt: str | None) -> BatchHook | None:
    """A batch rewrite that gives training the eval suite's prompts: `question_suffix` is
    appended to vqa/pope questions, and with `caption_prompt` caption batches become QA pairs
    with that prompt. None when both are unset (the batches stay as the views give them)."""
    if not question_suffix and caption_prompt is None:
        return None

    def hook(batch: dict[str, Any]) -> dict[str, Any]:
        task = batch["task"]
        if question_suffix and task in ("vqa", "pope"):
            return {**batch, "questions": [q + question_suffix for q in batch["questions"]]}
        if caption_prompt is not None and task == "caption":
            n = len(batch["captions"])
            return {**batch, "task": "vqa", "questions": [caption_prompt] * n,
                    "answers": list(batch["captions"])}  # fmt: skip
        return batch

    return hook


@dataclass(frozen=True)
class TokenizerSource:
    """Where the frozen SeTok (and, from a Stage I export, its decoders) come from."""

    tokenizer: Path
    decoder: Path | None = None
    mask_decoder: Path | None = None
    painter: Path | None = None


def resolve_tokenizer_source(path: str | os.PathLike[str]) -> TokenizerSource:
    """A Stage I export dir (tokenizer/ + decoders) or a bare SeTok.save_pretrained dir."""
    root = Path(path).resolve()
    if (root / "tokenizer").is_dir():
        dec, mask, painter = root / "diffusion", root / "mask_decoder", root / "painter"
        return TokenizerSource(
            root / "tokenizer",
            dec if dec.is_dir() else None,
            mask if mask.is_dir() else None,
            painter if painter.is_dir() else None,
        )
    if not root.is_dir():
        raise FileNotFoundError(f"init_tokenizer: {root} is not a directory")
    return TokenizerSource(root)


# ---- data (shared with Stage III) --------------------------------------------------------------
class MLLMBatches:
    """Endless, resumable micro-batches of `SequenceLayout`s from one task view (or "mix").

    The resumable stream is `common.endless_batches` (shared with the quickstart and Stage
    I). `hook` may rewrite a task-view batch before it becomes samples (Stage III's prompt
    formats).
    """

    def __init__(
        self,
        data: DataConfig,
        mode: str,
        cfg: SeTokIMConfig,
        tokenizer: Any,
        hook: BatchHook | None = None,
        max_text_tokens: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.data, self.mode, self.cfg = data, mode, cfg
        self.tokenizer = tokenizer
        self.ids = special_ids(tokenizer, cfg)
        self.hook = hook
        self.max_text_tokens = max_text_tokens

    def layout(self, batch: dict[str, Any]) -> SequenceLayout:
        """One task-view batch -> the model's collated input."""
        from setokim.model.samples import batch_to_samples

        if self.hook is not None:
            batch = self.hook(batch)
        samples = batch_to_samples(batch, self.mode, self.cfg.chat)
        return collate_sequences(
            samples, self.tokenizer, self.ids, max_text_tokens=self.max_text_tokens
        )

    def __call__(
        self, rank: int, world_size: int, start_step: int, micro_batch_size: int
    ) -> Iterator[SequenceLayout]:
        for batch in endless_batches(self.data, rank, world_size, start_step, micro_batch_size):
            yield self.layout(batch)


def llm_layers(model: nn.Module) -> list[nn.Module]:
    """The LLM's decoder layers: the FSDP2 units (adapters share their base layer's unit)."""
    return list(model.llm.get_decoder().layers)  # type: ignore[union-attr, operator]


def export_model(
    stage: Any, checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str]
) -> Path:
    """Rebuild `stage`'s model, load a trainer checkpoint step dir, `save_pretrained` it."""
    from setokim.train.checkpoint import load_model_state

    model = stage.build_model()
    load_model_state(Path(checkpoint), model)
    model.config = replace(model.config, **stage.export_fields())
    return model.save_pretrained(out_dir)


def export_sharded(
    stage: Any, checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str]
) -> Path:
    """Collective (every rank calls it): a trainer checkpoint as a sharded full export.

    Each rank reads its share of the trained weights from the checkpoint and writes its own
    shard, cast to the LLM's dtype as `export_model`'s model holds them; the frozen SeTok
    and decoders are left out (`FROZEN_PREFIXES`). Rank 0 adds the config, text tokenizer
    and SeTok from a model whose LLM is on the meta device, so no rank builds the LLM. A
    killed export resumes (`sharded.write_sharded_export`).
    """
    from setokim.model.export import FROZEN_PREFIXES, write_full_parts
    from setokim.model.setokim import _DTYPES
    from setokim.model.sharded import export_checkpoint_weights
    from setokim.train.checkpoint import read_frozen_record

    frozen = read_frozen_record(Path(checkpoint)) or {}
    if "llm" in frozen:
        raise ValueError(
            f"{checkpoint}: the LLM is frozen and not stored in the checkpoint (llm.freeze); "
            "a sharded export has no weights to take it from: export with one process"
        )

    def fill(staging: Path) -> None:
        model = stage.build_model(meta_llm=True)
        config = replace(model.config, **stage.export_fields())
        write_full_parts(model, staging, config)

    dtype = _DTYPES[stage.model_cfg.llm.dtype]
    return export_checkpoint_weights(
        checkpoint, out_dir, dtype=dtype, exclude=FROZEN_PREFIXES, fill=fill
    )


class MLLMStage:
    """What Stage II and III share: FSDP units, data, loss, export and describe.

    Subclasses set `name`, `mode`, `cfg` (with `data`), `model_cfg` and provide
    `text_tokenizer`, `export_fields` and `build_model`.
    """

    name: str
    mode: str
    cfg: Any
    model_cfg: SeTokIMConfig

    def text_tokenizer(self) -> Any:
        raise NotImplementedError

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        return llm_layers(model)

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return trainable_parameters(model)

    def batch_hook(self) -> BatchHook | None:
        return None

    def epoch_batches(self, rank: int, world_size: int, micro_batch_size: int) -> int:
        """Micro-batches per rank in one epoch of `batches` (TrainerConfig.epochs)."""
        return epoch_batches(self.cfg.data, rank, world_size, micro_batch_size, self.cfg)

    def batches(
        self, rank: int, world_size: int, start_step: int, micro_batch_size: int
    ) -> Iterator[SequenceLayout]:
        prepare_data(self.cfg.data, rank, self.cfg)
        source = MLLMBatches(
            self.cfg.data,
            self.mode,
            self.model_cfg,
            self.text_tokenizer(),
            hook=self.batch_hook(),
            max_text_tokens=self.cfg.max_text_tokens,
        )
        return source(rank, world_size, start_step, micro_batch_size)

    def loss(self, model: nn.Module, batch: SequenceLayout) -> tuple[Tensor, dict[str, float]]:
        from setokim.model.losses import stage_loss

        loss, metrics = stage_loss(model, batch)
        metrics.pop("loss", None)  # the loop logs the loss itself
        return loss, metrics

    def export(self, checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
        """Trainer checkpoint step dir -> `SeTokIM.save_pretrained(out_dir)`."""
        return export_model(self, checkpoint, out_dir)

    def describe(self) -> dict[str, Any]:
        return describe_config(self.name, self.cfg, model=self.model_cfg)


# ---- Stage II ----------------------------------------------------------------------------------
@dataclass
class Stage2Config(GenerateFields):
    """model / tokenizer / data: the experiment's groups (`${mllm}`, `${tokenizer}`, `${data}`);
    a partial mapping keeps the defaults below, key by key. `tokenizer` is the seeded random
    SeTok built when `init_tokenizer` is None.

    init_tokenizer: a Stage I export dir or a SeTok.save_pretrained dir.
    decoder_path / mask_decoder_path: Stage I decoders recorded in the export (default: the
        ones next to `init_tokenizer` in a Stage I export); not loaded for training.
    image_decoder: which decoder of the Stage I export generates and edits images:
        "diffusion" (the paper's) or "painter" (the token painter, when Stage I trained one:
        at CPU scale the tiny diffusion decoder draws noise).
    max_text_tokens: truncate each sample's text (None: no cap).
    question_suffix: appended to the questions of vqa/pope batches when the mix has them (ours:
        Stage II of a randomly initialised LLM can also see QA pairs, as ALLaVA's are in the
        paper's Stage II), so that they read as Stage III's and the eval suite's.
    """

    model: SeTokIMConfig = field(default_factory=SeTokIMConfig)
    tokenizer: SeTokConfig = field(default_factory=tiny_tokenizer)
    init_tokenizer: str | None = None
    decoder_path: str | None = None
    mask_decoder_path: str | None = None
    image_decoder: str = "diffusion"
    data: DataConfig = field(
        default_factory=lambda: shapes_data(
            "data/shapes_world_setokim", "mix", "caption", "t2i", "edit", "chat"
        )
    )
    max_text_tokens: int | None = None
    question_suffix: str = ""
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        require(
            self.image_decoder in IMAGE_DECODERS, self, "image_decoder",
            f"must be one of {IMAGE_DECODERS}",
        )  # fmt: skip


class Stage2Stage(MLLMStage):
    """Stage protocol implementation (see setokim.train.stage.Stage)."""

    name = "stage2"
    mode = "pretrain"
    collective_export = True  # several ranks: each writes its shard (`export`)

    def __init__(self, cfg: Stage2Config) -> None:
        self.cfg = cfg
        self.source = resolve_tokenizer_source(cfg.init_tokenizer) if cfg.init_tokenizer else None
        # (no source yet when a pipeline is validated: its Stage I has not exported)
        if cfg.image_decoder == "painter" and not cfg.decoder_path and self.source is not None:
            if self.source.painter is None:
                raise ValueError(
                    f"stage2.image_decoder: 'painter', but init_tokenizer {cfg.init_tokenizer!r} "
                    "is not a Stage I export with painter/ (train Stage I with painter_weight > 0)"
                )
        model = replace(cfg.model, lora=replace(cfg.model.lora, enabled=False))
        self.model_cfg = model if self.source else replace(model, tokenizer=cfg.tokenizer)
        self._tokenizer: Any = None

    def text_tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = text_tokenizer_for(self.model_cfg)
        return self._tokenizer

    def export_fields(self) -> dict[str, Any]:
        """Config fields the exported model records (decoders for inference)."""
        src = self.source
        default = (
            src.painter if self.cfg.image_decoder == "painter" else src.decoder if src else None
        )
        dec = self.cfg.decoder_path or default
        mask = self.cfg.mask_decoder_path or (src.mask_decoder if src else None)
        return {
            "decoder_path": None if dec is None else str(Path(dec).resolve()),
            "mask_decoder_path": None if mask is None else str(Path(mask).resolve()),
        }

    def batch_hook(self) -> BatchHook | None:
        return prompt_hook(self.cfg.question_suffix, None)

    def frozen_sources(self) -> dict[str, Path]:
        """The frozen SeTok's export (none for the seeded random one, which the config
        rebuilds) and a frozen pretrained LLM's folder (`llm.freeze`): checkpoints reference
        them by path and SHA-256 instead of storing them."""
        out = {} if self.source is None else {"setok": self.source.tokenizer}
        llm = self.model_cfg.llm
        if llm.freeze and llm.pretrained_path is not None:
            out["llm"] = Path(llm.pretrained_path)
        return out

    def build_model(self, meta_llm: bool = False) -> nn.Module:
        """SeTokIM with the frozen SeTok; decoders are left out (only the export names them).
        `meta_llm`: the LLM's shapes only, on the meta device (a sharded export's config)."""
        from setokim.model.lora import trainable_summary
        from setokim.model.setokim import SeTokIM, build_vision_tokenizer

        set_cpu_threads(self.cfg.cpu_threads)
        cfg = replace(self.model_cfg, decoder_path=None, mask_decoder_path=None)
        if self.source is not None:
            cfg = replace(cfg, tokenizer_path=str(self.source.tokenizer))
        vision = build_vision_tokenizer(cfg)
        cfg = replace(cfg, tokenizer=vision.cfg)
        text = self.text_tokenizer()
        llm = _meta_llm(cfg, text) if meta_llm else None
        model = SeTokIM.from_config(cfg, llm=llm, vision_tokenizer=vision, text_tokenizer=text)
        if is_main() and not meta_llm:
            print(f"{self.name}: {trainable_summary(model)}")
        return model

    def export(self, checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
        """One process: `export_model` (one `model.safetensors`). Several ranks: collective,
        every rank writes its shard (`export_sharded`)."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            return export_sharded(self, checkpoint, out_dir)
        return export_model(self, checkpoint, out_dir)


def _meta_llm(cfg: SeTokIMConfig, text_tokenizer: Any) -> nn.Module:
    """The LLM `SeTokIM.from_config` would build, on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from setokim.model.setokim import _DTYPES, _build_llm, add_special_tokens, special_token_strings

    add_special_tokens(text_tokenizer, special_token_strings(cfg))
    with torch.device("meta"):
        if cfg.llm.pretrained_path is None:
            return _build_llm(cfg.llm, len(text_tokenizer), cfg.seed)
        hf = AutoConfig.from_pretrained(cfg.llm.pretrained_path, local_files_only=True)
        return AutoModelForCausalLM.from_config(hf).to(_DTYPES[cfg.llm.dtype])


def build(cfg: Mapping[str, Any]) -> Stage2Stage:
    """Registry entry: unknown keys are an error naming them."""
    return Stage2Stage(from_dict(Stage2Config, cfg, where="stage2"))


__all__ = [
    "MLLMBatches",
    "MLLMStage",
    "Stage2Config",
    "Stage2Stage",
    "TokenizerSource",
    "build",
    "export_model",
    "export_sharded",
    "llm_layers",
    "resolve_tokenizer_source",
]
