"""Stage III: LoRA instruction tuning of SeTokIM (paper Section 2.2, Table 7).

The same objective as Stage II (`stage_loss`), but the samples are chats rendered with the
model's template and only assistant answers carry labels ("instruct" mode of
`batch_to_samples`); edited images in answers keep their regression targets. peft LoRA
adapters are injected into the LLM's projections and only they (plus `lora.train_heads`)
train. Data: a per-batch mix of vqa, pope, rec, reasonseg, chat and edit.

Initialisation: `init_from` is a Stage II export, one `model.safetensors` or sharded
(`setokim.model.sharded`): its LLM is built on the meta device and takes the exported tensors,
one copy of the weights (text tokenizer, SeTok and decoder paths come with it); under FSDP2
on several ranks (`build_model_deferred`) each rank reads only its rows after sharding.
None builds a seeded random tiny model (tests).

Export (`export`): an adapter export (`setokim.model.export`): the LoRA adapters, the
`lora.train_heads` weights, the config and the text tokenizer, pointing at `init_from`
(absolute path, weights sha256 recorded); `SeTokIM.from_pretrained` loads that base and
re-injects the adapters. `python -m setokim.model.export merge` makes a self-contained copy.
With `init_from` None there is no base, so the export is full (adapters unmerged).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from setok_tokenizer.config import SeTokConfig, from_dict
from setokim.data.config import DataConfig
from setokim.model.config import LoRAConfig, SeTokIMConfig
from setokim.model.setokim import text_tokenizer_for
from setokim.stages.common import (
    GenerateFields,
    is_main,
    set_cpu_threads,
    shapes_data,
    tiny_tokenizer,
)
from setokim.stages.stage2 import (
    BatchHook,
    MLLMStage,
    prompt_hook,
    resolve_tokenizer_source,
)
from setokim.train.stage import DeferredModel


@dataclass
class Stage3Config(GenerateFields):
    """init_from: a Stage II export (None: a random tiny model from `model`/`tokenizer`,
    or with the SeTok of `init_tokenizer`). model / tokenizer / data: the experiment's groups,
    a partial mapping keeps the defaults below. lora: LoRAConfig keys (rank, alpha, dropout,
    target_modules, train_heads) that replace those of `model.lora`; always enabled.

    question_suffix: appended to vqa/pope questions (LLaVA-1.5 trains its short-answer VQA
        data with "\\nAnswer the question using a single word or phrase.").
    caption_prompt: when set, caption batches become QA pairs with this prompt instead of
        `samples.CAPTION_PROMPT` (so training matches an eval suite's prompt).
    """

    init_from: str | None = None
    model: SeTokIMConfig = field(default_factory=SeTokIMConfig)
    tokenizer: SeTokConfig = field(default_factory=tiny_tokenizer)
    init_tokenizer: str | None = None
    lora: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(
        default_factory=lambda: shapes_data(
            "data/shapes_world_setokim", "mix", "vqa", "pope", "rec", "reasonseg", "chat", "edit"
        )
    )
    question_suffix: str = ""
    caption_prompt: str | None = None
    max_text_tokens: int | None = None
    cpu_threads: int | None = None


class Stage3Stage(MLLMStage):
    """Stage protocol implementation (see setokim.train.stage.Stage)."""

    name = "stage3"
    mode = "instruct"

    def __init__(self, cfg: Stage3Config) -> None:
        self.cfg = cfg
        if cfg.init_from is not None:
            path = Path(cfg.init_from)
            if not (path / "setokim_config.json").is_file():
                raise FileNotFoundError(
                    f"stage3: init_from {str(path)!r} is not a SeTokIM.save_pretrained dir "
                    "(no setokim_config.json)"
                )
            raw = json.loads((path / "setokim_config.json").read_text(encoding="utf-8"))
            raw.pop("llm_config", None)
            base = from_dict(SeTokIMConfig, raw, where="stage3: init_from")
        elif cfg.init_tokenizer is None:
            base = replace(cfg.model, tokenizer=cfg.tokenizer)
        else:
            base = cfg.model
        lora = from_dict(LoRAConfig, {**cfg.lora, "enabled": True}, cfg.model.lora, "stage3.lora")
        self.model_cfg = replace(base, lora=lora)
        self._tokenizer: Any = None

    def text_tokenizer(self) -> Any:
        if self._tokenizer is None:
            path = (
                None if self.cfg.init_from is None else Path(self.cfg.init_from) / "text_tokenizer"
            )
            self._tokenizer = text_tokenizer_for(self.model_cfg, path)
        return self._tokenizer

    def export_fields(self) -> dict[str, Any]:
        return {"lora": self.model_cfg.lora}

    def frozen_sources(self) -> dict[str, Path]:
        """What the frozen weights are built from: the Stage II export (LLM, projector, its
        SeTok), or the SeTok of `init_tokenizer` under a seeded random LLM (none for a fully
        random model). Checkpoints hold the LoRA adapters and train_heads only."""
        if self.cfg.init_from is not None:
            return {"base": Path(self.cfg.init_from)}
        if self.cfg.init_tokenizer is not None:
            return {"setok": resolve_tokenizer_source(self.cfg.init_tokenizer).tokenizer}
        return {}

    def build_model(self, *, defer_llm: bool = False) -> nn.Module:
        """The Stage II model (or a random tiny one) with LoRA injected; all else frozen.
        `defer_llm`: leave the export's LLM on the meta device (`build_model_deferred`)."""
        from setokim.model.lora import adapter_dtype, apply_lora, trainable_summary

        set_cpu_threads(self.cfg.cpu_threads)
        lora = self.model_cfg.lora
        if self.cfg.init_from is not None:
            from setokim.model.sharded import load_export_on_meta

            # The LLM is built on the meta device and given the export's tensors (one copy
            # in host memory; a sharded export's shards are read file by file). Decoders
            # are inference-only: Identity placeholders keep them from loading (and their
            # weights out of training checkpoints); the config keeps their paths.
            model = load_export_on_meta(
                self.cfg.init_from,
                defer_llm=defer_llm,
                text_tokenizer=self.text_tokenizer(),
                image_decoder=nn.Identity(),
                mask_decoder=nn.Identity(),
            )
            model.image_decoder = model.mask_decoder = None
        else:
            from setokim.model.setokim import SeTokIM

            cfg = replace(self.model_cfg, lora=replace(lora, enabled=False))
            vision = None
            if self.cfg.init_tokenizer is not None:
                from setok_tokenizer import SeTok

                src = resolve_tokenizer_source(self.cfg.init_tokenizer)
                vision = SeTok.from_pretrained(src.tokenizer)
                cfg = replace(cfg, tokenizer=vision.cfg, tokenizer_path=str(src.tokenizer))
            model = SeTokIM.from_config(
                cfg, vision_tokenizer=vision, text_tokenizer=self.text_tokenizer()
            )
        apply_lora(model, lora)
        adapter_dtype(model)
        model.config = replace(model.config, lora=lora)
        if is_main():
            print(f"{self.name}: {trainable_summary(model)}")
        return model

    def build_model_deferred(self) -> DeferredModel:
        """`build_model` with the Stage II export's LLM left on the meta device; the loop
        fills it after FSDP2 has sharded it, each rank reading only its rows (a whole copy
        per rank otherwise: ~26 GB of host memory for 13B in bf16)."""
        from setokim.model.sharded import materialise_from_export

        if self.cfg.init_from is None:  # a random tiny model: nothing to read
            return DeferredModel(self.build_model(), lambda device: None)
        export = Path(self.cfg.init_from)
        model = self.build_model(defer_llm=True)

        def materialise(device: torch.device) -> None:
            materialise_from_export(model, export, device)

        return DeferredModel(model, materialise)

    def batch_hook(self) -> BatchHook | None:
        return prompt_hook(self.cfg.question_suffix, self.cfg.caption_prompt)


def build(cfg: Mapping[str, Any]) -> Stage3Stage:
    """Registry entry: unknown keys are an error naming them."""
    return Stage3Stage(from_dict(Stage3Config, cfg, where="stage3"))


__all__ = ["Stage3Config", "Stage3Stage", "build"]
