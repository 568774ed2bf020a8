"""Task-view batches (setokim.data.schema) → interleaved `Sample`s for Stages II and III.

The prompts here are the ones `inference.Generator` uses, so training and inference agree.
Stage II ("pretrain") uses a plain interleaved format and trains every text token that is not
an instruction; Stage III ("instruct") renders a chat and trains answers only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def batch_to_samples(
    batch: Mapping[str, Any], mode: str, template: ChatTemplateConfig
) -> list[Sample]:
    """Convert one collated task-view batch into samples (one per item)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    task = batch["task"]
    pixels: Tensor = batch["pixels"]
    keys = batch["key"]
    out: list[Sample] = []
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
        elif task == "reasonseg":
            out.append(_qa(img, batch["queries"][b], batch["answers"][b], template, key))
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
    return out
