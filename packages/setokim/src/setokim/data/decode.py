"""Raw webdataset samples -> decoded tensors, with errors that name the shard and the key."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from setokim.data.rle import decode_mask
from setokim.data.schema import SampleAnnotation

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
TARGET_EXTS = tuple(f"target.{e}" for e in IMAGE_EXTS)


class DataError(RuntimeError):
    """A corrupt/truncated shard or sample; the message names the shard and sample key."""

    def __init__(self, shard: str, key: str | None, reason: str) -> None:
        self.shard, self.key, self.reason = shard, key, reason
        where = f"shard {shard!r}" + (f" sample {key!r}" if key else "")
        super().__init__(f"{where}: {reason}")


@dataclass
class Decoded:
    """One decoded sample; all spatial tensors are in the (S, S) output frame."""

    key: str
    shard: str
    ann: SampleAnnotation
    pixels: torch.Tensor  # float32 (3, S, S) in [0, 1]
    object_masks: torch.Tensor  # bool (O, S, S)
    boxes: torch.Tensor  # float32 (O, 4) xyxy
    target_pixels: torch.Tensor | None  # float32 (3, S, S) or None


def _image(data: bytes, size: int | None) -> tuple[torch.Tensor, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        rgb = im.convert("RGB")
    native = rgb.size
    if size is not None and native != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.asarray(rgb, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0), native


def _find(raw: dict[str, Any], exts: tuple[str, ...]) -> bytes | None:
    for ext in exts:
        if ext in raw:
            return raw[ext]
    return None


def decode_sample(raw: dict[str, Any], image_size: int | None) -> Decoded:
    """Decode a webdataset sample dict (``__key__``, ``__url__``, ``json``, image, ...).

    Raises DataError naming the shard and key on any missing part or undecodable byte.
    """
    key = str(raw.get("__key__"))
    shard = str(raw.get("__url__"))
    try:
        if "json" not in raw:
            raise ValueError("no .json annotation")
        ann = SampleAnnotation.from_json(raw["json"])
        img = _find(raw, IMAGE_EXTS)
        if img is None:
            raise ValueError(f"no image (one of {IMAGE_EXTS})")
        pixels, (w, h) = _image(img, image_size)
        s_h, s_w = pixels.shape[1:]
        tgt = _find(raw, TARGET_EXTS)
        target = _image(tgt, image_size)[0] if tgt is not None else None
        if target is not None and target.shape != pixels.shape:
            raise ValueError(f"target image {tuple(target.shape)} != image {tuple(pixels.shape)}")
        masks = np.zeros((len(ann.objects), s_h, s_w), dtype=bool)
        for i, o in enumerate(ann.objects):
            if o.mask is None:
                continue
            m = decode_mask(o.mask)
            if m.shape != (h, w):
                raise ValueError(f"object {i} mask is {m.shape}, image is {(h, w)}")
            if (h, w) != (s_h, s_w):
                m = np.asarray(Image.fromarray(m).resize((s_w, s_h), Image.Resampling.NEAREST))
            masks[i] = m
        scale = torch.tensor([s_w / w, s_h / h, s_w / w, s_h / h])
        boxes = (
            torch.tensor([o.bbox for o in ann.objects], dtype=torch.float32).reshape(-1, 4) * scale
        )
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - every decode failure becomes a DataError
        raise DataError(shard, key, f"cannot decode: {type(exc).__name__}: {exc}") from exc
    return Decoded(key, shard, ann, pixels, torch.from_numpy(masks), boxes, target)
