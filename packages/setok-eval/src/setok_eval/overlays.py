"""Token overlays: an image tinted by its cluster map, with cluster boundaries drawn."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from setok_eval.io import atomic_write_bytes
from setok_eval.metrics.tokenizer import resize_labels


def palette(n: int, seed: int = 0) -> np.ndarray:
    """n distinct-ish RGB colours (uint8)."""
    rng = np.random.default_rng(seed)
    return rng.integers(40, 256, size=(max(n, 1), 3)).astype(np.uint8)


def token_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend cluster colours into the image and mark label boundaries in white."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 3:
        raise ValueError(f"image must be HxWx3, got {img.shape}")
    lab = resize_labels(labels, img.shape[:2])
    _, inv = np.unique(lab, return_inverse=True)
    inv = inv.reshape(lab.shape)
    colours = palette(int(inv.max()) + 1)[inv].astype(np.float64)
    out = (1 - alpha) * img + alpha * colours
    edge = np.zeros(lab.shape, dtype=bool)
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    out[edge] = 255.0
    return np.clip(out, 0, 255).astype(np.uint8)


def save_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Atomically write an RGB (or label) array as PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
