"""SeTokIM: a frozen SeTok + an MLP projector + any causal LM + an embedding-regression head.

The LLM reads `[Img] u_1 … u_n [/Img]` where u_j = projector(SeTok token j) and n varies per
image; it writes text through its LM head and visual tokens through the regression head
(hidden → token width), trained with MSE to the frozen tokenizer's tokens (paper Stage II).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from setok_tokenizer.geometry import fourier_features, fourier_width, token_geometry
from setokim.model.config import (
    LLMConfig,
    SeTokIMConfig,
)
from setokim.model.local import load_local, load_text_tokenizer
from setokim.model.packing import (
    Packed,
    Sample,
    SequenceLayout,
    SpecialIds,
    collate_sequences,
    pack,
)
from setokim.model.text_tokenizer import add_special_tokens, build_text_tokenizer, token_id

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mlp(in_dim: int, out_dim: int, depth: int, hidden: int | None = None) -> nn.Sequential:
    """Linear → (GELU → Linear) × (depth-1); LLaVA's `mlp{depth}x_gelu` connector."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    hidden = hidden or out_dim
    dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(depth):
        if i > 0:
            layers.append(nn.GELU())
        layers.append(nn.Linear(dims[i], dims[i + 1]))
    return nn.Sequential(*layers)


@dataclass
class VisualTokens:
    """SeTok's output for the batch's images, computed without gradients (the frozen target)."""

    tokens: Tensor  # (I,K,d)
    token_mask: Tensor  # (I,K) bool
    raw: Any = None  # the tokenizer's full output (masks, features) when available
    num_regions: int = 0  # segmentation slots whose single token is a region embedding
    geometry: Tensor | None = None  # (I,K,7) where each token's cluster lies (visual_geometry)
    regions: RegionTargets | None = None  # what each region slot was picked from


@dataclass
class RegionTargets:
    """For the region slots, in image order: the input image's tokens (R,K,d) and validity
    (R,K) the region embedding was picked from, the picked index (R,), and which of the
    batch's images are region slots (I,)."""

    candidates: Tensor
    candidate_mask: Tensor
    target: Tensor
    is_region: Tensor


@dataclass
class SeTokIMOutput:
    """Everything the stage losses and the inference loop need from one forward."""

    logits: Tensor  # (B,T,V)
    hidden: Tensor  # (B,T,H) last hidden states
    packed: Packed
    visual: VisualTokens


def _build_llm(cfg: LLMConfig, vocab_size: int, seed: int) -> PreTrainedModel:
    dtype = _DTYPES[cfg.dtype]  # LLMConfig checks the name
    if cfg.pretrained_path is not None:
        return load_local(
            AutoModelForCausalLM, cfg.pretrained_path, "llm.pretrained_path", dtype=dtype
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).to(dtype)


def build_vision_tokenizer(cfg: SeTokIMConfig) -> nn.Module:
    """The Stage I SeTok from `tokenizer_path`, or a seeded random one from `tokenizer`."""
    from setok_tokenizer import SeTok  # lazy: keeps `import setokim.model` light

    if cfg.tokenizer_path is not None:
        return SeTok.from_pretrained(cfg.tokenizer_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return SeTok.from_config(cfg.tokenizer)


def special_token_strings(cfg: SeTokIMConfig) -> list[str]:
    """[Img], [/Img] and (when configured) the chat role markers."""
    tokens = [cfg.img_start, cfg.img_end]
    chat = cfg.chat
    if chat.add_role_tokens:
        tokens += [chat.system_prefix, chat.user_prefix, chat.assistant_prefix, chat.turn_end]
    return [t for t in tokens if t]


def text_tokenizer_for(
    cfg: SeTokIMConfig, path: str | os.PathLike[str] | None = None
) -> PreTrainedTokenizerBase:
    """The text tokenizer (from `path`, `cfg.text_tokenizer_path`, or the tiny built one)
    with SeTokIM's special tokens added; a stage collates with the model's own one."""
    path = path if path is not None else cfg.text_tokenizer_path
    tok = (
        build_text_tokenizer() if path is None else load_text_tokenizer(path, "text_tokenizer_path")
    )
    add_special_tokens(tok, special_token_strings(cfg))
    return tok


def special_ids(tokenizer: PreTrainedTokenizerBase, cfg: SeTokIMConfig) -> SpecialIds:
    """The ids packing uses: [Img], [/Img], pad, bos."""
    return SpecialIds(
        img_start=token_id(tokenizer, cfg.img_start),
        img_end=token_id(tokenizer, cfg.img_end),
        pad=int(tokenizer.pad_token_id),
        bos=tokenizer.bos_token_id,
    )


def _tokenizer_width(tokenizer: nn.Module) -> int:
    width = getattr(tokenizer, "output_dim", None)
    if not isinstance(width, int):
        raise TypeError("the vision tokenizer must expose an integer `output_dim`")
    return width


class SeTokIM(nn.Module):
    """The MLLM. Build with `SeTokIM.from_config(cfg)`; feed it `collate(samples)`."""

    def __init__(
        self,
        cfg: SeTokIMConfig,
        llm: PreTrainedModel,
        vision_tokenizer: nn.Module,
        text_tokenizer: PreTrainedTokenizerBase,
        *,
        image_decoder: nn.Module | None = None,
        mask_decoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.text_tokenizer = text_tokenizer
        add_special_tokens(text_tokenizer, special_token_strings(cfg))
        if llm.get_input_embeddings().num_embeddings < len(text_tokenizer):
            llm.resize_token_embeddings(len(text_tokenizer), mean_resizing=False)
        llm.config.pad_token_id = text_tokenizer.pad_token_id
        self.llm = llm
        self.vision_tokenizer = vision_tokenizer
        self.vision_tokenizer.requires_grad_(False)
        self.vision_tokenizer.eval()
        width = _tokenizer_width(vision_tokenizer)
        hidden = llm.config.get_text_config().hidden_size
        self.token_dim = width
        dtype = llm.get_input_embeddings().weight.dtype
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            self.projector = mlp(width, hidden, cfg.projector_depth).to(dtype)
            self.regression_head = mlp(hidden, width, cfg.regression_head_depth, hidden).to(dtype)
            # zero at the start, so that a model with it begins as one without
            self.geometry_embed = (
                nn.Linear(fourier_width(), hidden).to(dtype) if cfg.visual_geometry else None
            )
            if self.geometry_embed is not None:
                nn.init.zeros_(self.geometry_embed.weight)
                nn.init.zeros_(self.geometry_embed.bias)
        self.image_decoder = image_decoder
        self.mask_decoder = mask_decoder
        for dec in (image_decoder, mask_decoder):
            if dec is not None:
                dec.requires_grad_(False)
                dec.eval()
        self.ids = special_ids(text_tokenizer, cfg)
        if cfg.llm.freeze:
            self.llm.requires_grad_(False)
        # The full export this model was loaded from: the base of a Stage III adapter export.
        self.base_export: Path | None = None

    # ----------------------------------------------------------------- construction
    special_token_strings = staticmethod(special_token_strings)

    @classmethod
    def from_config(
        cls,
        cfg: SeTokIMConfig,
        *,
        llm: PreTrainedModel | None = None,
        vision_tokenizer: nn.Module | None = None,
        text_tokenizer: PreTrainedTokenizerBase | None = None,
        image_decoder: nn.Module | None = None,
        mask_decoder: nn.Module | None = None,
    ) -> SeTokIM:
        """Build every part from `cfg` (local paths only); pass parts to reuse them."""
        if text_tokenizer is None:
            text_tokenizer = text_tokenizer_for(cfg)
        add_special_tokens(text_tokenizer, special_token_strings(cfg))
        if llm is None:
            llm = _build_llm(cfg.llm, len(text_tokenizer), cfg.seed)
        if vision_tokenizer is None:
            vision_tokenizer = build_vision_tokenizer(cfg)
        if image_decoder is None and cfg.decoder_path is not None:
            from setok_decoders.io import load_image_decoder

            image_decoder = load_image_decoder(cfg.decoder_path)  # diffusion, or the painter
        if mask_decoder is None and cfg.mask_decoder_path is not None:
            from setok_decoders.mask_decoder import MaskDecoder

            mask_decoder = MaskDecoder.from_pretrained(cfg.mask_decoder_path)
        model = cls(
            cfg,
            llm,
            vision_tokenizer,
            text_tokenizer,
            image_decoder=image_decoder,
            mask_decoder=mask_decoder,
        )
        if cfg.lora.enabled:
            from setokim.model.lora import apply_lora

            apply_lora(model, cfg.lora)
        return model

    def train(self, mode: bool = True) -> SeTokIM:
        """Frozen parts stay in eval mode (dropout/BN off) whatever the trainer asks."""
        super().train(mode)
        self.vision_tokenizer.eval()
        for dec in (self.image_decoder, self.mask_decoder):
            if dec is not None:
                dec.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.projector[0].weight.device

    # ----------------------------------------------------------------- forward
    def collate(self, samples: Sequence[Sample], *, padding_side: str = "right") -> SequenceLayout:
        """Tokenise samples into a layout (CPU; call it in the data loader's collate_fn)."""
        return collate_sequences(samples, self.text_tokenizer, self.ids, padding_side=padding_side)

    @torch.no_grad()
    def encode_images(self, pixels: Tensor | None) -> VisualTokens:
        """Frozen SeTok tokens for (I,3,H,W) images; empty (0,1,d) when there are none."""
        if pixels is None or pixels.shape[0] == 0:
            empty = torch.zeros(0, 1, self.token_dim, device=self.device)
            return VisualTokens(empty, torch.zeros(0, 1, dtype=torch.bool, device=self.device))
        out = self.vision_tokenizer(self.preprocess(pixels))
        mask = out.token_mask.bool()
        geometry = token_geometry(out.masks, mask) if self.geometry_embed is not None else None
        return VisualTokens(out.tokens.detach(), mask, out, geometry=geometry)

    @torch.no_grad()
    def encode_layout(self, layout: SequenceLayout) -> VisualTokens:
        """Frozen targets for a layout: SeTok tokens per image, except that each region image
        (`layout.image_is_region`, from `Sample.region_images`) becomes ONE token, the region
        embedding of its mask over its sample's first image (`losses.region_embeddings`).
        `raw` then covers the non-region images only."""
        from setokim.model.losses import best_overlap_tokens

        if layout.num_images == 0 or not bool(layout.image_is_region.any()):
            return self.encode_images(layout.pixels)
        sample = layout.image_sample.to(self.device)
        region = layout.image_is_region.to(self.device)
        not_output = region & ~layout.image_output.to(self.device)
        if bool(not_output.any()):
            bad = int(sample[not_output][0])
            raise ValueError(f"sample {bad}: a region image must be an output image")
        # images are ordered by sample, so a sample's first image is found by searchsorted
        first = torch.searchsorted(sample, sample[region])
        if bool(region[first].any()):
            bad = int(sample[region][region[first]][0])
            raise ValueError(f"segmentation sample {bad}: its first image must be the input image")
        pixels = layout.pixels.to(self.device)
        enc = self.encode_images(pixels[~region])
        row = torch.cumsum((~region).long(), 0) - 1  # image index -> row of `enc`
        src = row[first]
        best = best_overlap_tokens(
            enc.token_mask[src], enc.raw.masks[src], pixels[region][:, 0] > 0.5
        )
        queries = enc.tokens[src, best].detach()  # losses.region_embeddings
        regions = RegionTargets(enc.tokens[src], enc.token_mask[src], best, region)
        I, K = layout.num_images, enc.tokens.shape[1]  # noqa: E741
        tokens = enc.tokens.new_zeros(I, K, enc.tokens.shape[-1])
        token_mask = torch.zeros(I, K, dtype=torch.bool, device=self.device)
        tokens[~region], token_mask[~region] = enc.tokens, enc.token_mask
        tokens[region, 0], token_mask[region, 0] = queries, True
        geometry = None
        if enc.geometry is not None:  # a region image is an output image: it gets none
            geometry = enc.geometry.new_zeros(I, K, enc.geometry.shape[-1])
            geometry[~region] = enc.geometry
        return VisualTokens(
            tokens, token_mask, enc.raw, num_regions=int(region.sum()), geometry=geometry,
            regions=regions,
        )  # fmt: skip

    def preprocess(self, pixels: Tensor) -> Tensor:
        """[0,1] pixels (B,3,H,W) → what the vision tokenizer's forward expects."""
        pixels = pixels.to(self.device)
        prep = getattr(self.vision_tokenizer, "preprocess", None)
        return prep(pixels) if callable(prep) else pixels

    def embed(
        self, layout: SequenceLayout, visual: VisualTokens | None = None
    ) -> tuple[Packed, VisualTokens]:
        """Pack text embeddings and projected visual tokens into the LLM's input batch."""
        layout = layout.to(self.device)
        if visual is None:
            visual = self.encode_layout(layout)
        text = self.llm.get_input_embeddings()(layout.text_ids)
        vis = self.projector(visual.tokens.to(self.projector[0].weight.dtype))
        if self.geometry_embed is not None and visual.geometry is not None:
            # input images only: an output image's tokens are regressed, and at inference
            # they have no clusters to read a geometry from
            features = fourier_features(visual.geometry.to(vis.dtype))
            is_input = ~layout.image_output.to(vis.device)
            vis = vis + self.geometry_embed(features) * is_input[:, None, None].to(vis.dtype)
        packed = pack(layout, text, vis, visual.token_mask, pad_id=self.ids.pad)
        return packed, visual

    def forward(self, layout: SequenceLayout, visual: VisualTokens | None = None) -> SeTokIMOutput:
        """One teacher-forced pass: logits and last hidden states for the whole batch."""
        packed, visual = self.embed(layout, visual)
        max_pos = getattr(self.llm.config.get_text_config(), "max_position_embeddings", None)
        if max_pos is not None and packed.inputs_embeds.shape[1] > max_pos:
            raise ValueError(
                f"packed sequence length {packed.inputs_embeds.shape[1]} exceeds the LLM's "
                f"max_position_embeddings={max_pos}"
            )
        hidden = self.llm.get_decoder()(
            inputs_embeds=packed.inputs_embeds,
            attention_mask=packed.attention_mask,
            position_ids=packed.position_ids,
            use_cache=False,
        ).last_hidden_state
        logits = self.llm.get_output_embeddings()(hidden)
        return SeTokIMOutput(logits=logits, hidden=hidden, packed=packed, visual=visual)

    # ----------------------------------------------------------------- inference
    def generator(self):
        """The inference helper (`setokim.model.inference.Generator`) bound to this model."""
        from setokim.model.inference import Generator

        return Generator(self)

    def understand(self, images, prompt, gen=None):
        """Caption / VQA: image(s) + prompt → text (a list for a list of prompts)."""
        return self.generator().understand(images, prompt, gen)

    def chat(self, messages, gen=None) -> str:
        """Multi-turn chat: the next assistant message for `messages` (chat.Message list)."""
        return self.generator().chat(messages, gen)

    def ground(self, image, expression, gen=None):
        """Referring expression → [x0,y0,x1,y1] in pixels."""
        return self.generator().ground(image, expression, gen)

    def segment(self, image, expression, gen=None):
        """Referring expression → bool mask (H,W) via the Stage I mask decoder."""
        return self.generator().segment(image, expression, gen)

    def generate_image(self, prompt, gen=None):
        """Text → image (3,H,W) in [0,1] via regressed visual tokens and the diffusion decoder."""
        return self.generator().generate_image(prompt, gen)

    def edit(self, image, instruction, gen=None):
        """Image + instruction → edited image (3,H,W) in [0,1]."""
        return self.generator().edit(image, instruction, gen)

    # ----------------------------------------------------------------- persistence
    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Weights that change in Stages II/III (LLM, projector, head; not SeTok/decoders)."""
        skip = ("vision_tokenizer.", "image_decoder.", "mask_decoder.")
        return {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}

    def save_pretrained(
        self,
        directory: str | os.PathLike[str],
        *,
        full: bool | None = None,
        base: str | os.PathLike[str] | None = None,
    ) -> Path:
        """Write an export (`setokim.model.export` describes both layouts), atomically.

        Without LoRA: a full export. With LoRA (Stage III):
        - full=None: an adapter export over `base` (default: the full export this model was
          loaded from, `self.base_export`); with no base known, a full export that keeps the
          adapters unmerged (a random tiny model, say).
        - full=True: a self-contained export with LoRA merged into the LLM weights.
        - full=False: an adapter export, or an error when there is no base.
        `base` is stored as given; a relative path is read relative to `directory`.
        """
        from setokim.model import export

        if full and base is not None:
            raise ValueError("base= is for adapter exports; full=True writes a self-contained one")
        lora = self.config.lora.enabled
        base = base if base is not None else self.base_export
        if full or (full is None and (not lora or base is None)):
            return export.save_full(self, directory, merge=bool(full))
        if not lora:
            raise ValueError("save_pretrained(full=False) writes LoRA adapters; lora is disabled")
        if base is None:
            raise ValueError(
                "save_pretrained(full=False) needs base=<the full export the LoRA model was "
                "initialised from>; this model was not loaded from one"
            )
        return export.save_adapter(self, directory, base)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike[str],
        *,
        base: str | os.PathLike[str] | None = None,
        device: torch.device | str = "cpu",
        **parts: Any,
    ) -> SeTokIM:
        """Inverse of `save_pretrained` (LLM rebuilt from its saved config, no download).

        The LLM is built on the meta device and given the export's tensors read straight onto
        `device` (no random LLM: one copy of the weights, and on a GPU about one tensor at a
        time in host memory); the rest of the model is moved there too. An adapter export
        loads its base export first (`base` overrides the recorded path, e.g. after moving
        it); `parts` replace parts as in `from_config`.
        """
        from setokim.model import export

        path = Path(directory)
        if export.is_adapter_export(path):
            return export.load_adapter(cls, path, parts, device, base=base)
        if base is not None:
            raise ValueError(f"base= applies to adapter exports; {str(path)!r} is a full export")
        return export.load_full(cls, path, parts, device)
