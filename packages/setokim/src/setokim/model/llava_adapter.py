"""SeTok inside an existing LLaVA-style MLLM (paper Appendix E, Table 9).

The checkpoint's own vision tower and projector stay; only the connector's input changes:
instead of one LLM token per patch, the patch features are clustered with SeTok's
density-peak clustering (Algorithm 1, hard assignment) and each cluster becomes one token,
the mean of its patches' features, pushed through the existing projector. `use_setok=False`
is the unmodified patch connector, so both arms of the comparison share this code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerBase

from setokim.model.losses import next_token_loss
from setokim.model.packing import (
    Image,
    Packed,
    Sample,
    SequenceLayout,
    SpecialIds,
    Text,
    collate_sequences,
    pack,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class SeTokLlavaConfig:
    """Clustering of the LLaVA patch grid; `use_setok=False` keeps one token per patch."""

    use_setok: bool = True
    max_clusters: int = 64
    knn_k: int = 5
    min_scope: float = 0.05
    kernel_scale: float | None = None
    feature_norm: str = "l2"  # l2 | none: the space distances are measured in
    image_token: str = "<image>"
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    train_vision_tower: bool = False


class SeTokLlava(nn.Module):
    """A LLaVA checkpoint whose LLM reads SeTok cluster tokens."""

    def __init__(
        self,
        llava: LlavaForConditionalGeneration,
        text_tokenizer: PreTrainedTokenizerBase,
        cfg: SeTokLlavaConfig | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg or SeTokLlavaConfig()
        self.llava = llava
        self.text_tokenizer = text_tokenizer
        if self.cfg.image_token not in text_tokenizer.get_vocab():
            text_tokenizer.add_special_tokens({"additional_special_tokens": [self.cfg.image_token]})
        if text_tokenizer.pad_token is None:
            text_tokenizer.pad_token = text_tokenizer.unk_token or text_tokenizer.eos_token
        self.ids = SpecialIds(-1, -1, int(text_tokenizer.pad_token_id), text_tokenizer.bos_token_id)
        self.llava.model.vision_tower.requires_grad_(self.cfg.train_vision_tower)
        self.register_buffer(
            "pixel_mean", torch.tensor(self.cfg.image_mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(self.cfg.image_std).view(1, 3, 1, 1), persistent=False
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        cfg: SeTokLlavaConfig | None = None,
        text_tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> SeTokLlava:
        """Load a LLaVA-format checkpoint (and its tokenizer) from a local directory."""
        from setokim.model.local import load_local, load_text_tokenizer

        llava = load_local(LlavaForConditionalGeneration, path, "LLaVA checkpoint path")
        tok = text_tokenizer or load_text_tokenizer(path, "LLaVA checkpoint path")
        return cls(llava, tok, cfg)

    # ------------------------------------------------------------ visual tokens
    def patch_features(self, pixels: Tensor) -> Tensor:
        """[0,1] pixels (B,3,H,W) → the patch features the projector was trained on (B,N,Dv)."""
        conf = self.llava.config
        x = (pixels.to(self.pixel_mean.device) - self.pixel_mean) / self.pixel_std
        out = self.llava.model.vision_tower(x, output_hidden_states=True)
        layer = conf.vision_feature_layer
        if not isinstance(layer, int):
            raise NotImplementedError("multi-layer vision_feature_layer is not supported")
        feats = out.hidden_states[layer]
        if conf.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        return feats

    def cluster_means(self, feats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B,N,D) → cluster-mean tokens (B,K,D), validity (B,K), hard masks (B,K,N)."""
        from setok_tokenizer.clustering import density_peak_scores, semantic_clustering

        b, n, _ = feats.shape
        if not self.cfg.use_setok:
            eye = torch.eye(n, device=feats.device, dtype=feats.dtype).expand(b, n, n)
            return feats, torch.ones(b, n, dtype=torch.bool, device=feats.device), eye
        x = F.normalize(feats, dim=-1) if self.cfg.feature_norm == "l2" else feats
        with torch.no_grad():
            scores = density_peak_scores(x.float(), self.cfg.knn_k)
            out = semantic_clustering(
                x.float(),
                scores,
                self.cfg.max_clusters,
                kernel_scale=self.cfg.kernel_scale,
                min_scope=self.cfg.min_scope,
                assignment="hard",
            )
        k = max(int(out.num_clusters.max()), 1)
        masks = out.masks[:, :k].detach().to(feats.dtype)
        valid = out.cluster_valid[:, :k]
        tokens = torch.einsum("bkn,bnd->bkd", masks, feats)
        tokens = tokens / masks.sum(-1, keepdim=True).clamp(min=1e-6)
        return tokens, valid, masks

    def visual_embeds(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The LLM-width visual tokens (B,K,H) and their validity (B,K)."""
        tokens, valid, _ = self.cluster_means(self.patch_features(pixels))
        return self.llava.model.multi_modal_projector(tokens), valid

    # ------------------------------------------------------------ sequences
    def sample(self, prompt: str, images: Tensor | None, answer: str | None = None) -> Sample:
        """`prompt` with one `<image>` per image (3,H,W stacked as (n,3,H,W)); answer is trained."""
        parts = prompt.split(self.cfg.image_token)
        n = 0 if images is None else int(images.shape[0])
        if len(parts) - 1 != n:
            raise ValueError(
                f"prompt has {len(parts) - 1} {self.cfg.image_token} markers for {n} images"
            )
        segments: list[Text | Image] = [Text(parts[0])]
        for i, part in enumerate(parts[1:]):
            segments += [Image(i), Text(part)]
        if answer is not None:
            segments.append(Text(answer, train=True))
            if self.text_tokenizer.eos_token:
                segments.append(Text(self.text_tokenizer.eos_token, train=True))
        return Sample(segments, images)

    def collate(self, samples: Sequence[Sample], padding_side: str = "right") -> SequenceLayout:
        return collate_sequences(
            samples, self.text_tokenizer, self.ids, padding_side=padding_side, wrap_images=False
        )

    def embed(self, layout: SequenceLayout) -> Packed:
        device = self.pixel_mean.device
        layout = layout.to(device)
        text = self.llava.get_input_embeddings()(layout.text_ids)
        if layout.pixels is None:
            vis = text.new_zeros(0, 1, text.shape[-1])
            valid = torch.zeros(0, 1, dtype=torch.bool, device=device)
        else:
            vis, valid = self.visual_embeds(layout.pixels)
        return pack(layout, text, vis, valid, pad_id=self.ids.pad)

    def forward(self, layout: SequenceLayout) -> tuple[Tensor, Tensor, Packed]:
        """(loss on trained text tokens, logits, packed batch)."""
        packed = self.embed(layout)
        out = self.llava.model.language_model(
            inputs_embeds=packed.inputs_embeds,
            attention_mask=packed.attention_mask,
            position_ids=packed.position_ids,
        )
        logits = self.llava.lm_head(out.last_hidden_state)
        loss, _ = next_token_loss(logits, packed.labels)
        return loss, logits, packed

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[str], images: Sequence[Tensor | None], max_new_tokens: int = 16
    ) -> list[str]:
        """Greedy answers for a batch (left padding, KV cache through HF generate)."""
        samples = [self.sample(p, im) for p, im in zip(prompts, images, strict=True)]
        packed = self.embed(self.collate(samples, padding_side="left"))
        out = self.llava.generate(
            inputs_embeds=packed.inputs_embeds,
            attention_mask=packed.attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.ids.pad,
        )
        return [self.text_tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]
