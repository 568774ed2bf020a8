"""Config dataclasses for SeTokIM (the MLLM of paper Section 2.2).

Plain dataclasses so Hydra structured configs can use them as schemas: a typo in an
override fails at compose time with the key's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from setok_tokenizer.config import SeTokConfig, require, require_choice, require_min

LLM_DTYPES = ("float32", "bfloat16", "float16")
SEGMENT_FROM = ("query", "nearest_token")
GROUND_FROM = ("text", "mask")


@dataclass
class LLMConfig:
    """The causal LM backbone.

    pretrained_path: a local transformers checkpoint (Vicuna on a cluster). When None a tiny
    random Llama is built from the sizes below (CPU tests), seeded by `SeTokIMConfig.seed`.
    """

    pretrained_path: str | None = None
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 2048
    dtype: str = "float32"  # float32 | bfloat16 | float16
    freeze: bool = False  # Stage III freezes it (LoRA trains adapters only)

    def __post_init__(self) -> None:
        require_choice(self, "dtype", LLM_DTYPES)
        require_min(self, 1, "hidden_size", "num_layers", "num_heads", "num_kv_heads")
        require_min(self, 1, "intermediate_size", "max_position_embeddings")


@dataclass
class LoRAConfig:
    """LoRA for Stage III instruction tuning (peft)."""

    enabled: bool = False
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # SeTokIM heads that keep training next to the adapters (full weights, not LoRA).
    train_heads: list[str] = field(default_factory=list)  # e.g. ["projector", "regression_head"]

    def __post_init__(self) -> None:
        require_min(self, 1, "rank", "alpha")
        require(0 <= self.dropout < 1, self, "dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class ChatTemplateConfig:
    """How turns are rendered. Role markers are added as special tokens when missing.

    The default uses dedicated role tokens (tiny tokenizer); `vicuna()` gives Vicuna v1.1.
    """

    system: str = "A conversation between a user and an assistant that sees and draws images."
    system_prefix: str = "<|system|>"
    user_prefix: str = "<|user|>"
    assistant_prefix: str = "<|assistant|>"
    turn_end: str = "<|end|>"
    add_role_tokens: bool = True  # add the prefixes/turn_end as special tokens
    # ours: a user turn's text before its images (images keep their order), so that in a
    # causal LM the visual tokens can attend to the question; the paper's LLaVA-style order
    # (images first) is the default
    prompt_before_images: bool = False


def vicuna_chat_template() -> ChatTemplateConfig:
    """Vicuna v1.1 style: plain-text roles, `</s>` ends an assistant turn."""
    return ChatTemplateConfig(
        system="A chat between a curious user and an artificial intelligence assistant.",
        system_prefix="",
        user_prefix="USER:",
        assistant_prefix="ASSISTANT:",
        turn_end="</s>",
        add_role_tokens=False,
    )


@dataclass
class SeTokIMConfig:
    """The whole MLLM: SeTok (frozen) + projector + LLM + regression head (+ LoRA).

    tokenizer_path: a Stage I SeTok checkpoint dir (`SeTok.from_pretrained`); None builds
    `tokenizer` from its config (random, for CPU tests).
    text_tokenizer_path: a local HF tokenizer dir; None builds the tiny word-level one.
    decoder_path / mask_decoder_path: Stage I decoders for generate/edit/segment.
    """

    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: SeTokConfig = field(default_factory=SeTokConfig)
    tokenizer_path: str | None = None
    text_tokenizer_path: str | None = None
    decoder_path: str | None = None
    mask_decoder_path: str | None = None
    projector_depth: int = 2  # MLP layers token width -> LLM width (LLaVA's mlp2x_gelu)
    regression_head_depth: int = 2  # MLP layers LLM hidden -> token width
    lm_loss_weight: float = 1.0
    regression_loss_weight: float = 1.0
    # ours: a segmentation sample's regressed region embedding is also trained to pick its
    # target among the input image's tokens (losses.region_contrast_loss); 0 leaves it out
    region_contrast_weight: float = 0.0
    max_visual_tokens: int = 64  # cap when generating visual embeddings
    # ours, not the paper's: add to each input image's projected token a learned embedding
    # of where its cluster lies (setok_tokenizer.geometry: centre, box, size)
    visual_geometry: bool = False
    # How segment and ground turn the regressed embedding into a mask and a box.
    # segment_from "query": the embedding alone queries the Stage I mask decoder (the paper);
    # "nearest_token" (ours): the decoder draws the masks of all the image's tokens together,
    # as Stage I trains it, and the token nearest the embedding (cosine) names the mask.
    # ground_from "text": the LLM writes the box (the paper); "mask" (ours): the box around
    # segment's mask.
    segment_from: str = "query"
    ground_from: str = "text"
    img_start: str = "[Img]"
    img_end: str = "[/Img]"
    chat: ChatTemplateConfig = field(default_factory=ChatTemplateConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        require_min(self, 1, "projector_depth", "regression_head_depth", "max_visual_tokens")
        require_min(self, 0, "lm_loss_weight", "regression_loss_weight", "region_contrast_weight")
        require_choice(self, "segment_from", SEGMENT_FROM)
        require_choice(self, "ground_from", GROUND_FROM)
