"""The chat template: messages → an interleaved `Sample` with answer-only training flags.

Rendering (default template, role tokens are special tokens):
    <|system|> SYSTEM <|user|> TEXT [Img]…[/Img] <|assistant|> ANSWER <|end|> <|user|> …
Only assistant content and its `turn_end` are trained (Stage III's answer-only loss);
images inside an assistant turn are outputs (generated/edited images). With
`prompt_before_images` a user turn's text comes before its images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from setokim.model.config import ChatTemplateConfig
from setokim.model.packing import Image, Sample, Text

ROLES = ("system", "user", "assistant")


@dataclass
class Message:
    """One turn. `content` holds strings and images (3,H,W) in [0,1], in order."""

    role: str
    content: list[str | Tensor] = field(default_factory=list)


def _text(prefix: str, body: str) -> str:
    return f"{prefix} {body}".strip() if prefix else body


def render(
    messages: Sequence[Message],
    template: ChatTemplateConfig,
    *,
    add_generation_prompt: bool = False,
    key: str = "",
) -> Sample:
    """Render a conversation; `add_generation_prompt` ends with an open assistant turn."""
    segments: list[Text | Image] = []
    images: list[Tensor] = []
    if not messages or messages[0].role != "system":
        if template.system:
            segments.append(Text(_text(template.system_prefix, template.system) + " "))
    for i, msg in enumerate(messages):
        if msg.role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {ROLES}, got {msg.role!r}")
        answer = msg.role == "assistant"
        prefix = {
            "system": template.system_prefix,
            "user": template.user_prefix,
            "assistant": template.assistant_prefix,
        }[msg.role]
        if prefix:
            segments.append(Text(prefix + " "))
        content = list(msg.content)
        if template.prompt_before_images and msg.role == "user":
            content.sort(key=lambda part: isinstance(part, Tensor))  # stable: text, then images
        for part in content:
            if isinstance(part, str):
                segments.append(Text(part, train=answer))
            elif isinstance(part, Tensor):
                if part.dim() != 3 or part.shape[0] != 3:
                    raise ValueError(
                        f"messages[{i}] has an image of shape {tuple(part.shape)}; expected (3,H,W)"
                    )
                segments.append(Image(len(images), output=answer))
                images.append(part)
            else:
                raise TypeError(f"messages[{i}].content holds a {type(part).__name__}")
        if answer and template.turn_end:
            segments.append(Text(" " + template.turn_end, train=True))
        else:
            segments.append(Text(" "))
    if add_generation_prompt and template.assistant_prefix:
        segments.append(Text(template.assistant_prefix + " "))
    pixels = torch.stack(images) if images else None
    return Sample(segments=segments, images=pixels, key=key)
