"""SeTokIM behind the eval suite's adapter protocol (setok_eval.adapters).

The suite hands batches of `Request`s (task, doc, formatted prompt, generation settings) and
expects, in order: understand → str, ground → xyxy pixel box, segment → bool (H,W) at the
document image's size, generate / edit → HxWx3 uint8, tokenize → int cluster map (h,w).
Images are resized to the model's input size; boxes and masks are mapped back. Documents'
own fields (expression, instruction, caption) are used when present so the model sees the
prompts it was trained with.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from setokim.model.inference import GenerationConfig


def generation_config(settings: Mapping[str, Any], base: GenerationConfig) -> GenerationConfig:
    """Map the suite's generation settings (HF-style names) onto ours."""
    known = {
        "max_new_tokens": "max_new_tokens",
        "top_p": "top_p",
        "top_k": "top_k",
        "seed": "seed",
        "guidance_scale": "guidance_scale",
        "num_inference_steps": "decoder_steps",
        "max_visual_tokens": "max_visual_tokens",
    }
    values = dict(asdict(base))
    for key, value in settings.items():
        if key in known:
            values[known[key]] = value
    temperature = settings.get("temperature")
    if temperature is not None:
        values["do_sample"] = float(temperature) > 0
        values["temperature"] = float(temperature) if float(temperature) > 0 else 1.0
    if "do_sample" in settings:
        values["do_sample"] = bool(settings["do_sample"])
    return GenerationConfig(**values)


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class SeTokIMAdapter:
    """`ModelAdapter` for a SeTokIM; `image_size` is the model's input resolution."""

    def __init__(
        self,
        model,
        *,
        image_size: int | None = None,
        batch_size: int = 8,
        generation: GenerationConfig | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
    ) -> None:
        self.model = model.eval()
        enc = getattr(getattr(model.config, "tokenizer", None), "encoder", None)
        self.image_size = int(image_size or getattr(enc, "image_size", 64))
        self.batch_size = batch_size
        self.base = generation or GenerationConfig()
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        **kwargs: Any,
    ) -> SeTokIMAdapter:
        """Load `SeTokIM.save_pretrained` output (local directory) straight onto `device`
        (None: `SeTokIM.from_pretrained`'s default, the CPU); no random LLM is built."""
        from setokim.model.setokim import SeTokIM

        load = {} if device is None else {"device": device}
        return cls(SeTokIM.from_pretrained(directory, **load), checkpoint=directory, **kwargs)

    def fingerprint(self) -> str:
        """Hash of the config, the decoding defaults and the weights (an export's file hashes,
        with an adapter export's base, when loaded from one)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps(asdict(self.model.config), sort_keys=True, default=str).encode())
            h.update(json.dumps(asdict(self.base), sort_keys=True).encode())
            h.update(str(self.image_size).encode())
            if self.checkpoint is not None and any(self.checkpoint.rglob("*.safetensors")):
                from setokim.model.export import export_digest

                h.update(export_digest(self.checkpoint).encode())  # adapters: + the base's
            else:
                for name, tensor in sorted(self.model.state_dict().items()):
                    h.update(name.encode())
                    h.update(tensor.detach().float().cpu().numpy().tobytes())
            self._fingerprint = "setokim:" + h.hexdigest()[:16]
        return self._fingerprint

    # ------------------------------------------------------------ conversions
    def _pixels(self, image: np.ndarray) -> Tensor:
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"document image must be HxWx3, got {image.shape}")
        t = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 255.0
        return F.interpolate(t[None], size=(self.image_size,) * 2, mode="bilinear", antialias=True)[
            0
        ]

    @staticmethod
    def _uint8(image: Tensor) -> np.ndarray:
        return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()

    def _gen(self, batch: Sequence[Any]) -> GenerationConfig:
        return generation_config(batch[0].generation, self.base)

    @staticmethod
    def _field(request: Any, *names: str) -> str:
        for name in names:
            value = request.doc.get(name)
            if isinstance(value, str) and value:
                return value
        return request.prompt

    # ------------------------------------------------------------ protocol
    def understand(self, requests: Sequence[Any]) -> list[str]:
        out: list[str] = []
        for batch in _chunks(requests, self.batch_size):
            images = [[self._pixels(r.load_image())] if r.image_path else [] for r in batch]
            out += self.model.understand(images, [r.prompt for r in batch], self._gen(batch))
        return out

    def ground(self, requests: Sequence[Any]) -> list[list[float]]:
        out: list[list[float]] = []
        for batch in _chunks(requests, self.batch_size):
            raw = [r.load_image() for r in batch]
            images = [[self._pixels(im)] for im in raw]
            exprs = [self._field(r, "expression") for r in batch]
            boxes = self.model.ground(images, exprs, self._gen(batch))
            for box, im in zip(boxes, raw, strict=True):
                sx, sy = im.shape[1] / self.image_size, im.shape[0] / self.image_size
                out.append([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy])
        return out

    def segment(self, requests: Sequence[Any]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for batch in _chunks(requests, self.batch_size):
            raw = [r.load_image() for r in batch]
            images = [[self._pixels(im)] for im in raw]
            # ReasonSeg documents name their target in `query` (Stage III trains on it)
            exprs = [self._field(r, "expression", "query") for r in batch]
            masks = self.model.segment(images, exprs, self._gen(batch))
            for mask, im in zip(masks, raw, strict=True):
                full = F.interpolate(mask[None, None].float(), size=im.shape[:2], mode="nearest")
                out.append(full[0, 0].bool().cpu().numpy())
        return out

    def generate(self, requests: Sequence[Any]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for batch in _chunks(requests, self.batch_size):
            prompts = [self._field(r, "caption") for r in batch]
            images = self.model.generate_image(prompts, self._gen(batch))
            out += [self._uint8(img) for img in images]
        return out

    def edit(self, requests: Sequence[Any]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for batch in _chunks(requests, self.batch_size):
            images = [[self._pixels(r.load_image())] for r in batch]
            instructions = [self._field(r, "instruction") for r in batch]
            edited = self.model.edit(images, instructions, self._gen(batch))
            out += [self._uint8(img) for img in edited]
        return out

    @torch.no_grad()
    def tokenize(self, requests: Sequence[Any]) -> list[np.ndarray]:
        """Cluster map (h,w): each grid cell's strongest SeTok cluster (label 1..K)."""
        out: list[np.ndarray] = []
        for batch in _chunks(requests, self.batch_size):
            pixels = torch.stack([self._pixels(r.load_image()) for r in batch])
            res = self.model.encode_images(pixels).raw
            masks = res.masks.masked_fill(~res.token_mask[:, :, None, None], -1.0)
            out += list((masks.argmax(1) + 1).cpu().numpy().astype(np.int64))
        return out


def from_export(
    export: str | os.PathLike[str] | None = None,
    batch_size: int | str = 8,
    image_size: int | str | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    device: str | None = None,
) -> SeTokIMAdapter:
    """The eval suite's registered "setokim" adapter: `export` is a SeTokIM export directory
    (`SeTokIM.save_pretrained`, e.g. a pipeline's `<run>/stage3/export`), read onto `device`
    (e.g. cuda:0; None: the CPU). Values may come as strings (`eval_suite/run.py
    --adapter-arg key=value`)."""
    del run_dir  # the suite passes it to every factory; the export names the model
    if export is None:
        raise ValueError("the setokim adapter needs --adapter-arg export=DIR (a SeTokIM export)")
    path = Path(export)
    if not path.is_dir():
        raise FileNotFoundError(f"export {str(path)!r} is not a SeTokIM export directory")
    return SeTokIMAdapter.from_pretrained(
        path,
        device=device or None,
        batch_size=int(batch_size),
        image_size=None if image_size in (None, "") else int(image_size),
    )
