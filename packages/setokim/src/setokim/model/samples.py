"""Task-view batches (setokim.data.schema) → interleaved `Sample`s for Stages II and III.

The prompts here are the ones `inference.Generator` uses, so training and inference agree.
Stage II ("pretrain") uses a plain interleaved format and trains every text token that is not
an instruction; Stage III ("instruct") renders a chat and trains answers only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from setokim.model.chat import Message, render
from setokim.model.config import ChatTemplateConfig
from setokim.model.packing import Image, Sample, Text

CAPTION_PROMPT = "Describe the image."
GROUND_PROMPT = "Where is {}? Answer with a box."
SEGMENT_PROMPT = "Segment {}."
MODES = ("pretrain", "instruct")
# Appended to the key of a segmentation sample so it differs from the item's other sample.
# Only a name: the model finds region targets through `Sample.region_images`, never by key.
REGION_KEY_SUFFIX = "#region"


def format_box(box: Sequence[float]) -> str:
    """Pixels xyxy → "[x0,y0,x1,y1]" with integer coordinates (what `ground` parses)."""
    if len(box) != 4:
        raise ValueError(f"box must have 4 numbers, got {len(box)}")
    return "[" + ",".join(str(round(float(v))) for v in box) + "]"


def _qa(
    image: Tensor, question: str, answer: str, template: ChatTemplateConfig, key: str
) -> Sample:
    return render(
        [Message("user", [image, question]), Message("assistant", [answer])], template, key=key
    )


def conversation_messages(turns: Sequence[Mapping[str, str]], image: Tensor) -> list[Message]:
    """LLaVA-format turns ({"from": "human"|"gpt", "value"}) → messages; "<image>" places the image
    (prepended to the first human turn when absent)."""
    messages: list[Message] = []
    placed = False
    for i, turn in enumerate(turns):
        who = turn.get("from")
        if who not in ("human", "gpt"):
            raise ValueError(f"conversation turn {i} has from={who!r}; expected 'human' or 'gpt'")
        text = str(turn.get("value", ""))
        content: list[str | Tensor] = []
        if who == "human" and not placed:
            before, found, after = text.partition("<image>")
            content = [before.strip(), image, after.strip()] if found else [image, text]
            placed = True
        else:
            content = [text.replace("<image>", "").strip()]
        messages.append(
            Message(
                "user" if who == "human" else "assistant",
                [c for c in content if not isinstance(c, str) or c],
            )
        )
    return messages


def segment_sample(
    image: Tensor, mask: Tensor, expression: str, mode: str, template: ChatTemplateConfig, key: str
) -> Sample:
    """Image + "Segment {expression}." → one output slot whose target is the mask's region.

    The mask (broadcast to 3 channels) is image 1, marked in `region_images`; the model replaces
    its slot by ONE region embedding of the frozen SeTok (`losses.region_embeddings`): the query
    `Generator.segment` feeds the mask decoder is what the regression head predicts from
    `[Img]`'s hidden state. Instruct mode renders the same chat `Generator.segment` prompts
    with, so the text before the output `[Img]` is identical at training and inference time.
    """
    if mask.shape != image.shape[-2:]:
        raise ValueError(
            f"mask must match the image's (H,W)={tuple(image.shape[-2:])}, got {tuple(mask.shape)}"
        )
    if not bool(mask.bool().any()):
        raise ValueError(f"mask of sample {key!r} is empty")
    region = mask.to(image.dtype)[None].expand_as(image)
    prompt = SEGMENT_PROMPT.format(expression)
    key = key + REGION_KEY_SUFFIX
    if mode == "pretrain":
        segments = [Image(0), Text(" " + prompt + " "), Image(1, output=True)]
        return Sample(segments, torch.stack([image, region]), key, region_images=(1,))
    msgs = [Message("user", [image, prompt]), Message("assistant", [region])]
    return replace(render(msgs, template, key=key), region_images=(1,))


def _target_mask(batch: Mapping[str, Any], b: int) -> Tensor | None:
    """Item b's target mask, or None when the batch has none or it is empty (nothing to learn)."""
    if "target_masks" not in batch:
        return None
    mask = torch.as_tensor(batch["target_masks"][b])
    if mask.shape != batch["pixels"].shape[-2:]:
        raise ValueError(
            f"batch['target_masks'][{b}] has shape {tuple(mask.shape)}; "
            f"expected the pixels' (H,W)={tuple(batch['pixels'].shape[-2:])}"
        )
    return mask if bool(mask.bool().any()) else None


def batch_to_samples(
    batch: Mapping[str, Any], mode: str, template: ChatTemplateConfig
) -> list[Sample]:
    """Convert one collated task-view batch into samples (one per item).

    rec / reasonseg batches with `target_masks` also yield one segmentation sample per item
    (`segment_sample`), appended after the per-item samples.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    task = batch["task"]
    pixels: Tensor = batch["pixels"]
    keys = batch["key"]
    out: list[Sample] = []
    seg: list[Sample] = []
    for b in range(pixels.shape[0]):
        img, key = pixels[b], keys[b]
        if task == "caption":
            if mode == "pretrain":  # image → caption
                out.append(
                    Sample([Image(0), Text(" " + batch["captions"][b], train=True)], img[None], key)
                )
            else:
                out.append(_qa(img, CAPTION_PROMPT, batch["captions"][b], template, key))
        elif task == "t2i":
            caption = batch["captions"][b]
            if mode == "pretrain":  # caption → image: [Img] and the visual tokens are targets
                out.append(Sample([Text(caption + " "), Image(0, output=True)], img[None], key))
            else:
                out.append(
                    render(
                        [Message("user", [caption]), Message("assistant", [img])], template, key=key
                    )
                )
        elif task in ("vqa", "pope"):
            out.append(_qa(img, batch["questions"][b], batch["answers"][b], template, key))
        elif task == "rec":
            box = format_box(batch["target_boxes"][b].tolist())
            out.append(_qa(img, GROUND_PROMPT.format(batch["expressions"][b]), box, template, key))
            mask = _target_mask(batch, b)
            if mask is not None:
                seg.append(segment_sample(img, mask, batch["expressions"][b], mode, template, key))
        elif task == "reasonseg":
            out.append(_qa(img, batch["queries"][b], batch["answers"][b], template, key))
            mask = _target_mask(batch, b)
            if mask is not None:
                seg.append(segment_sample(img, mask, batch["queries"][b], mode, template, key))
        elif task == "edit":
            target = batch["target_pixels"][b]
            instruction = batch["instructions"][b]
            if mode == "pretrain":
                out.append(
                    Sample(
                        [Image(0), Text(" " + instruction + " "), Image(1, output=True)],
                        torch.stack([img, target]),
                        key,
                    )
                )
            else:
                msgs = [Message("user", [img, instruction]), Message("assistant", [target])]
                out.append(render(msgs, template, key=key))
        elif task == "chat":
            out.append(
                render(conversation_messages(batch["conversations"][b], img), template, key=key)
            )
        else:
            raise ValueError(f"batch['task'] {task!r} has no SeTokIM sample format")
    return out + seg
