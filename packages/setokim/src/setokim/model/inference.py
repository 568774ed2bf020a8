"""Inference for all four task groups: understand / ground / segment / generate / edit.

Text is produced by Hugging Face `generate` on `inputs_embeds` (KV cache, greedy or
sampling, left-padded batches). Visual embeddings are produced by our own loop: after `[Img]`
the regression head's output is projected back into the LLM and fed one step at a time with
the same KV cache, until the LM head prefers `[/Img]` or `max_visual_tokens` is reached.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from setokim.model.chat import Message, render
from setokim.model.config import GROUND_FROM, SEGMENT_FROM
from setokim.model.packing import Sample, Text
from setokim.model.samples import GROUND_PROMPT, SEGMENT_PROMPT

BOX_RE = re.compile(
    r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]"
)
_BOX_FULL = re.compile(r"\[\d{1,4}(,\d{1,4}){3}\]")


@dataclass
class GenerationConfig:
    """Decoding settings shared by every mode."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_visual_tokens: int | None = None  # None: the model config's max_visual_tokens
    min_visual_tokens: int = 1
    decoder_steps: int = 20
    guidance_scale: float = 1.0
    segment_from: str | None = None  # None: the model config's (SeTokIMConfig.segment_from)
    ground_from: str | None = None  # None: the model config's (SeTokIMConfig.ground_from)


@dataclass
class VisualGeneration:
    """Regressed visual tokens (B,K,d) with validity (B,K) and the stop reason per sample."""

    tokens: Tensor
    token_mask: Tensor
    stopped: Tensor  # (B,) True when [/Img] was predicted before the cap


def parse_box(text: str) -> list[float] | None:
    """The first "[x0,y0,x1,y1]" in `text` as 4 floats, or None."""
    match = BOX_RE.search(text)
    return [float(v) for v in match.groups()] if match else None


def _is_box_prefix(s: str) -> bool:
    """Whether `s` (no spaces) can still grow into "[d,d,d,d]" with 1-4 digit numbers."""
    if not s:
        return True
    if s[0] != "[":
        return False
    body = s[1:]
    closed = body.endswith("]")
    if closed:
        body = body[:-1]
    parts = body.split(",")
    if len(parts) > 4 or any(not p.isdigit() and p != "" for p in parts):
        return False
    if any(len(p) > 4 for p in parts) or any(p == "" for p in parts[:-1]):
        return False
    if closed:
        return len(parts) == 4 and parts[-1] != ""
    return True


class BoxConstraint:
    """`prefix_allowed_tokens_fn` forcing the answer to be exactly "[x0,y0,x1,y1]" then end.

    Works for any tokenizer: candidate tokens are those whose surface form (WordPiece "##",
    SentencePiece "▁" and byte-BPE "Ġ" markers removed) uses only "0-9,[]".
    """

    def __init__(self, tokenizer, end_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.end_ids = [int(i) for i in end_ids]
        self.pieces: dict[int, str] = {}
        for tok, idx in tokenizer.get_vocab().items():
            surface = tok.replace("##", "").replace("▁", "").replace("Ġ", "")
            if surface and all(c in "0123456789,[]" for c in surface):
                self.pieces[idx] = surface

    def surface(self, ids: Sequence[int] | Tensor) -> str:
        """The box text of generated ids: their surfaces joined. `tokenizer.decode` is no use
        here: WordPiece decoding puts spaces between digit pieces ("[ 5 2, 9, ...")."""
        values = ids.tolist() if isinstance(ids, Tensor) else ids
        return "".join(self.pieces.get(int(i), "") for i in values)

    def __call__(self, batch_id: int, input_ids: Tensor) -> list[int]:
        # every generated id came from `pieces` (or an end id), so join surfaces directly
        text = self.surface(input_ids)
        if _BOX_FULL.fullmatch(text):
            return self.end_ids
        allowed = [i for i, p in self.pieces.items() if _is_box_prefix(text + p)]
        return allowed or self.end_ids


def _as_batch(images, prompts) -> tuple[list[list[Tensor]], list[str], bool]:
    """Normalise (image | images | list of images per sample, prompt | prompts) to batch form."""
    batched = not isinstance(prompts, str)
    prompt_list = [prompts] if not batched else list(prompts)
    if images is None:
        per = [[] for _ in prompt_list]
    elif isinstance(images, Tensor):
        if images.dim() == 3:
            images = [images]
        elif images.dim() == 4:
            images = list(images)
        else:
            raise ValueError(f"images must be (3,H,W) or (B,3,H,W), got {tuple(images.shape)}")
        per = [[img] for img in images] if batched else [list(images)]
    else:
        per = [[x] if isinstance(x, Tensor) else list(x) for x in images]
        if not batched:
            per = [[img for group in per for img in group]]
    if len(per) != len(prompt_list):
        raise ValueError(f"got {len(per)} image groups for {len(prompt_list)} prompts")
    return per, prompt_list, batched


class Generator:
    """Inference over one `SeTokIM` (also exposed as methods on the model)."""

    def __init__(self, model) -> None:
        self.model = model
        tok = model.text_tokenizer
        self.end_ids = [
            i
            for i in {tok.convert_tokens_to_ids(model.config.chat.turn_end), tok.eos_token_id}
            if i is not None and i != tok.unk_token_id
        ]

    # ------------------------------------------------------------ prompts
    def prompt_sample(
        self, images: Sequence[Tensor], prompt: str, answer_prefix: str = ""
    ) -> Sample:
        """A single-turn chat (images first, then the prompt) with an open assistant turn."""
        msg = Message("user", [*images, prompt])
        sample = render([msg], self.model.config.chat, add_generation_prompt=True)
        if answer_prefix:
            sample.segments.append(Text(answer_prefix))
        return sample

    def _generator(self, gen: GenerationConfig) -> torch.Generator | None:
        if gen.seed is None:
            return None
        return torch.Generator(device=self.model.device).manual_seed(gen.seed)

    # ------------------------------------------------------------ text
    @torch.no_grad()
    def generate_text(
        self,
        samples: Sequence[Sample],
        gen: GenerationConfig,
        *,
        constraint=None,
        decode: Callable[[Tensor], str] | None = None,
    ) -> list[str]:
        """Continue each sample with text (batched, left-padded, KV-cached HF generate).

        decode: generated ids of one sample -> text (default: the tokenizer's decode)."""
        model = self.model
        layout = model.collate(samples, padding_side="left")
        packed, _ = model.embed(layout)
        kwargs = {
            "max_new_tokens": gen.max_new_tokens,
            "do_sample": gen.do_sample,
            "pad_token_id": model.ids.pad,
            "eos_token_id": self.end_ids,
        }
        if gen.do_sample:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
        if constraint is not None:
            kwargs["prefix_allowed_tokens_fn"] = constraint
        if gen.seed is not None:
            torch.manual_seed(gen.seed)
        out = model.llm.generate(
            inputs_embeds=packed.inputs_embeds,
            attention_mask=packed.attention_mask,
            **kwargs,
        )
        if decode is None:
            return [model.text_tokenizer.decode(r, skip_special_tokens=True).strip() for r in out]
        return [decode(row) for row in out]

    # ------------------------------------------------------------ visual embeddings
    @torch.no_grad()
    def generate_visual(self, samples: Sequence[Sample], gen: GenerationConfig) -> VisualGeneration:
        """Regress visual tokens after each sample's trailing `[Img]` (one cache, one loop over steps)."""
        model = self.model
        cap = gen.max_visual_tokens or model.config.max_visual_tokens
        if cap < 1 or gen.min_visual_tokens > cap:
            raise ValueError(
                f"max_visual_tokens={cap} must be >= min_visual_tokens={gen.min_visual_tokens} >= 1"
            )
        layout = model.collate(samples, padding_side="left")
        last = layout.text_ids[torch.arange(layout.batch_size), layout.text_len - 1]
        if not bool((last == model.ids.img_start).all()):
            raise ValueError(
                "every sample must end with the image-start token before generate_visual"
            )
        packed, _ = model.embed(layout)
        decoder = model.llm.get_decoder()
        head = model.llm.get_output_embeddings()
        out = decoder(
            inputs_embeds=packed.inputs_embeds,
            attention_mask=packed.attention_mask,
            position_ids=packed.position_ids,
            use_cache=True,
        )
        cache = out.cache
        h = out.last_hidden_state[:, -1]
        attn = packed.attention_mask
        pos = packed.position_ids[:, -1]
        B = h.shape[0]
        alive = torch.ones(B, dtype=torch.bool, device=h.device)
        stopped = torch.zeros_like(alive)
        rng = self._generator(gen)
        tokens: list[Tensor] = []
        masks: list[Tensor] = []
        for step in range(cap):
            if step >= gen.min_visual_tokens:
                logits = head(h).float()
                if gen.do_sample:
                    probs = torch.softmax(logits / max(gen.temperature, 1e-5), -1)
                    choice = torch.multinomial(probs, 1, generator=rng)[:, 0]
                else:
                    choice = logits.argmax(-1)
                end = choice == model.ids.img_end
                stopped |= end & alive
                alive &= ~end
                if not bool(alive.any()):
                    break
            tok = model.regression_head(h)
            tokens.append(tok)
            masks.append(alive.clone())
            emb = model.projector(tok)[:, None]
            attn = torch.cat([attn, attn.new_ones(B, 1)], 1)
            pos = pos + 1
            out = decoder(
                inputs_embeds=emb,
                attention_mask=attn,
                position_ids=pos[:, None],
                cache=cache,
                use_cache=True,
            )
            cache = out.cache
            h = out.last_hidden_state[:, -1]
        return VisualGeneration(torch.stack(tokens, 1), torch.stack(masks, 1), stopped)

    # ------------------------------------------------------------ task APIs
    def understand(self, images, prompt, gen: GenerationConfig | None = None):
        """Caption / VQA: image(s) + prompt → answer text (str, or list for a list of prompts)."""
        per, prompts, batched = _as_batch(images, prompt)
        samples = [self.prompt_sample(imgs, p) for imgs, p in zip(per, prompts, strict=True)]
        texts = self.generate_text(samples, gen or GenerationConfig())
        return texts if batched else texts[0]

    def chat(self, messages: Sequence[Message], gen: GenerationConfig | None = None) -> str:
        """Multi-turn: the next assistant message for a conversation."""
        sample = render(messages, self.model.config.chat, add_generation_prompt=True)
        return self.generate_text([sample], gen or GenerationConfig())[0]

    def ground(self, images, expressions, gen: GenerationConfig | None = None):
        """Referring expression → box [x0,y0,x1,y1] (4 floats; decoding constrained to the format)."""
        gen = gen or GenerationConfig(max_new_tokens=24)
        if _choice(gen, self.model.config, "ground_from", GROUND_FROM) == "mask":
            masks = self.segment(images, expressions, gen)
            return mask_boxes(masks) if masks.dim() == 3 else mask_boxes(masks[None])[0]
        per, exprs, batched = _as_batch(images, expressions)
        samples = [
            self.prompt_sample(imgs, GROUND_PROMPT.format(e))
            for imgs, e in zip(per, exprs, strict=True)
        ]
        constraint = BoxConstraint(self.model.text_tokenizer, self.end_ids)
        texts = self.generate_text(samples, gen, constraint=constraint, decode=constraint.surface)
        boxes = []
        for text, imgs in zip(texts, per, strict=True):
            h, w = imgs[0].shape[-2:] if imgs else (0, 0)
            box = parse_box(text)
            if box is None:  # only when max_new_tokens cut the box short
                box = [0.0, 0.0, float(w), float(h)]
            elif imgs:  # ordered corners inside the image (digits alone can say 4222)
                x0, x1 = sorted(min(max(v, 0.0), float(w)) for v in (box[0], box[2]))
                y0, y1 = sorted(min(max(v, 0.0), float(h)) for v in (box[1], box[3]))
                box = [x0, y0, x1, y1]
            boxes.append(box)
        return boxes if batched else boxes[0]

    def _visual_prompt(
        self, images, prompts, template: str
    ) -> tuple[list[Sample], list[list[Tensor]], bool]:
        per, prompts, batched = _as_batch(images, prompts)
        img_start = self.model.config.img_start
        samples = [
            self.prompt_sample(imgs, template.format(p), answer_prefix=img_start)
            for imgs, p in zip(per, prompts, strict=True)
        ]
        return samples, per, batched

    def decode_images(self, vis: VisualGeneration, gen: GenerationConfig) -> Tensor:
        """Visual tokens → (B,3,H,W) in [0,1] through the Stage I diffusion decoder."""
        decoder = self.model.image_decoder
        if decoder is None:
            raise RuntimeError("this SeTokIM has no image_decoder (set decoder_path in its config)")
        images = decoder.decode(
            vis.tokens,
            vis.token_mask,
            num_steps=gen.decoder_steps,
            guidance_scale=gen.guidance_scale,
            generator=self._generator(gen),
        )
        return images.clamp(0, 1)

    def generate_image(self, prompts, gen: GenerationConfig | None = None):
        """Text → image (3,H,W) in [0,1] (or (B,3,H,W) for a list of prompts)."""
        gen = gen or GenerationConfig()
        samples, _, batched = self._visual_prompt(None, prompts, "{}")
        images = self.decode_images(self.generate_visual(samples, gen), gen)
        return images if batched else images[0]

    def edit(self, images, instructions, gen: GenerationConfig | None = None):
        """Image + instruction → edited image (3,H,W) in [0,1] (batched for lists)."""
        gen = gen or GenerationConfig()
        samples, _, batched = self._visual_prompt(images, instructions, "{}")
        out = self.decode_images(self.generate_visual(samples, gen), gen)
        return out if batched else out[0]

    def segment(self, images, expressions, gen: GenerationConfig | None = None):
        """Referring expression → bool mask (H,W): the LLM's regressed embedding queries the
        Stage I mask decoder over the image's SeTok features (`segment_from`: alone, or by
        naming the nearest of the image's tokens)."""
        model = self.model
        if model.mask_decoder is None:
            raise RuntimeError(
                "this SeTokIM has no mask_decoder (set mask_decoder_path in its config)"
            )
        gen = gen or GenerationConfig()
        one = GenerationConfig(**{**gen.__dict__, "max_visual_tokens": 1, "min_visual_tokens": 1})
        samples, per, batched = self._visual_prompt(images, expressions, SEGMENT_PROMPT)
        if any(len(imgs) != 1 for imgs in per):
            raise ValueError("segment needs exactly one image per expression")
        vis = self.generate_visual(samples, one)
        pixels = torch.stack([imgs[0] for imgs in per]).to(model.device)
        nearest = _choice(gen, model.config, "segment_from", SEGMENT_FROM) == "nearest_token"
        masks = segment_masks(model, pixels, vis.tokens[:, :1], nearest_token=nearest)
        return masks if batched else masks[0]


def _choice(gen: GenerationConfig, config, name: str, allowed: tuple[str, ...]) -> str:
    """`gen`'s setting `name`, else the model config's; an unknown value is an error."""
    value = getattr(gen, name) or getattr(config, name)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def mask_boxes(masks: Tensor) -> list[list[float]]:
    """(B,H,W) bool masks → xyxy pixel boxes around each; an empty mask gives [0,0,0,0]
    (no box, so it overlaps nothing) rather than a guess."""
    boxes = []
    for mask in masks:
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if xs.numel() == 0:
            boxes.append([0.0, 0.0, 0.0, 0.0])
            continue
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1])
    return boxes


@torch.no_grad()
def segment_masks(model, pixels: Tensor, queries: Tensor, nearest_token: bool = False) -> Tensor:
    """(B,3,H,W) images + one query token each (B,1,d) → bool masks (B,H,W).

    nearest_token: the decoder draws the masks of all the image's valid tokens together (as
    Stage I trains it) and each image's mask is that of the token nearest its query by
    cosine. The regression under MSE shrinks its predictions toward the mean token, which
    moves their length more than their direction.
    """
    size = tuple(pixels.shape[-2:])
    setok_out = model.vision_tokenizer(model.preprocess(pixels))
    if nearest_token:
        tokens, token_mask = setok_out.tokens, setok_out.token_mask.bool()
        logits = model.mask_decoder(tokens, token_mask, setok_out.features, output_size=size)
        pick = nearest_tokens(tokens, token_mask, queries[:, 0])
        return logits[torch.arange(len(pick), device=pick.device), pick] > 0
    query_mask = torch.ones(queries.shape[:2], dtype=torch.bool, device=queries.device)
    logits = model.mask_decoder(queries, query_mask, setok_out.features, output_size=size)
    return logits[:, 0] > 0


def nearest_tokens(tokens: Tensor, token_mask: Tensor, queries: Tensor) -> Tensor:
    """(B,K,d) tokens, (B,K) validity, (B,d) queries → (B,) index of each row's valid token
    with the highest cosine similarity to its query."""
    if not bool(token_mask.bool().any(1).all()):
        raise ValueError("every image needs at least one valid token to pick from")
    cos = torch.nn.functional.cosine_similarity(tokens, queries[:, None], dim=-1)
    return cos.masked_fill(~token_mask.bool(), -2.0).argmax(1)
