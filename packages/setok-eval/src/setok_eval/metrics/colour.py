"""Named-colour match of generated images: does the picture's main colour follow the prompt?

A text-to-image model that ignores its prompt still draws something; FID and L1 to one
reference scene say little at small scale. This classifier names each pixel by the nearest
colour of a fixed palette (the data's object colours plus its background colours), takes the
most frequent object colour as the image's dominant colour, and asks whether the prompt names
it. The same generated images scored against the other documents' prompts give the rate an
image that ignores its own prompt reaches (the control printed beside it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from setok_eval.metrics.image import to_float_image

Palette = Mapping[str, Sequence[float]]


def _palette_array(palette: Palette, what: str) -> tuple[list[str], np.ndarray]:
    names = list(palette)
    rgb = np.asarray([palette[n] for n in names], dtype=np.float64).reshape(len(names), -1)
    if rgb.shape[1] != 3 or (rgb.size and (rgb.min() < 0 or rgb.max() > 255)):
        raise ValueError(f"colour_match: {what} must map names to [r, g, b] in 0..255")
    return names, rgb / 255.0


def dominant_colour(image: np.ndarray, colours: Palette, background: Palette) -> str | None:
    """The object colour that the most pixels are nearest to; None when every pixel is
    nearest to a background colour (nothing drawn)."""
    if not colours:
        raise ValueError("colour_match: args.colours is empty")
    names, rgb = _palette_array({**colours, **background}, "colours and background")
    pixels = to_float_image(image).reshape(-1, 3)
    nearest = ((pixels[:, None, :] - rgb[None]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(nearest, minlength=len(names))[: len(colours)]
    return names[int(counts.argmax())] if counts.max() > 0 else None


def named_colours(text: str, colours: Sequence[str]) -> set[str]:
    """The palette colours that `text` names as whole words (case-insensitive)."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    return {c for c in colours if c.lower() in words}


def colour_match_states(
    dominant: Sequence[str | None], prompts: Sequence[str], colours: Sequence[str]
) -> tuple[np.ndarray, float]:
    """Per image 1.0 when its dominant colour is named by its own prompt, and the mean rate
    over the other prompts (each image against every prompt but its own)."""
    named = [named_colours(p, colours) for p in prompts]
    hits = np.asarray([[d is not None and d in n for n in named] for d in dominant], dtype=float)
    own = np.diag(hits).copy() if hits.size else np.zeros(0)
    n = len(prompts)
    other = float((hits.sum() - own.sum()) / (n * (n - 1))) if n > 1 else float("nan")
    return own, other
