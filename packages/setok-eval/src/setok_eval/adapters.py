"""The model adapter protocol: how the suite talks to any model without importing it.

Methods are batched (a list of requests in, a list of outputs out, same order):
understand -> str, ground -> xyxy pixel box, segment -> bool mask (H, W) at image size,
generate / edit -> HxWx3 uint8 image, tokenize -> int cluster map (h, w) (any resolution;
it is resized to the mask size for scoring). An adapter implements only what it supports.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from setok_eval.codec import decode_labels
from setok_eval.documents import load_image
from setok_eval.io import file_hash


@dataclass(frozen=True)
class Request:
    """One model call: the task, document, formatted prompt and generation settings."""

    task: str
    doc_id: str
    prompt: str
    doc: Mapping[str, Any]
    generation: Mapping[str, Any] = field(default_factory=dict)

    @property
    def image_path(self) -> str | None:
        value = self.doc.get("image")
        return value if isinstance(value, str) else None

    def load_image(self) -> np.ndarray:
        """The document's input image as HxWx3 uint8 (error when the document has none)."""
        if self.image_path is None:
            raise ValueError(f"task {self.task!r} document {self.doc_id!r} has no 'image'")
        return load_image(self.image_path)


@runtime_checkable
class ModelAdapter(Protocol):
    """What `run_eval` needs from a model. `fingerprint` identifies weights + settings: it is
    part of every cache key, so a changed model never reuses stale predictions."""

    def fingerprint(self) -> str: ...


class ReplayAdapter:
    """Serves saved predictions: a JSONL file of {"task", "id", "prediction"} lines.

    Text predictions are strings, boxes xyxy lists, masks / cluster maps either encoded label
    maps (`setok_eval.codec`) or image paths, images paths (relative to the file's folder).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ReplayAdapter: predictions file not found: {self.path}")
        self._fingerprint = f"replay:{file_hash(self.path)}"
        self._preds: dict[tuple[str, str], Any] = {}
        with open(self.path, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    key = (str(rec["task"]), str(rec["id"]))
                    self._preds[key] = rec["prediction"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise ValueError(
                        f"ReplayAdapter: {self.path}:{line_no} must be JSON with task, id, prediction"
                    ) from exc

    def fingerprint(self) -> str:
        return self._fingerprint

    def _get(self, request: Request) -> Any:
        try:
            return self._preds[(request.task, request.doc_id)]
        except KeyError:
            raise KeyError(
                f"ReplayAdapter: no saved prediction for task {request.task!r} doc {request.doc_id!r}"
            ) from None

    def _array(self, value: Any, image: bool) -> np.ndarray:
        if isinstance(value, str):
            p = Path(value) if Path(value).is_absolute() else self.path.parent / value
            if image:
                return load_image(p)
            from setok_eval.documents import load_label_map

            return load_label_map(p)
        if isinstance(value, Mapping):
            return decode_labels(dict(value))
        return np.asarray(value)

    def understand(self, requests: Sequence[Request]) -> list[str]:
        return [str(self._get(r)) for r in requests]

    def ground(self, requests: Sequence[Request]) -> list[list[float]]:
        return [[float(v) for v in self._get(r)] for r in requests]

    def segment(self, requests: Sequence[Request]) -> list[np.ndarray]:
        return [self._array(self._get(r), image=False) > 0 for r in requests]

    def generate(self, requests: Sequence[Request]) -> list[np.ndarray]:
        return [self._array(self._get(r), image=True) for r in requests]

    def edit(self, requests: Sequence[Request]) -> list[np.ndarray]:
        return self.generate(requests)

    def tokenize(self, requests: Sequence[Request]) -> list[np.ndarray]:
        return [self._array(self._get(r), image=False) for r in requests]
