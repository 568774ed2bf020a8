"""The on-disk sample format and the collated batch layout of every task view.

Other parts of setokim code against this file: the generator and every converter write
`SampleAnnotation` JSON next to the image in a webdataset tar; the loader decodes it and
collates one *task view* into a dict of padded tensors and lists described by `BATCH_FIELDS`.

On disk (one webdataset sample, key ``{split}-{index:08d}`` or a converter's own key)::

    {key}.png | {key}.jpg            the image (RGB)
    {key}.json                       SampleAnnotation.to_json()
    {key}.target.png | .target.jpg   optional: the edited image (edit pairs)

Coordinates are pixels of the stored image, boxes are ``[x0, y0, x1, y1]`` (x1, y1
exclusive), masks are pycocotools RLE dicts ``{"size": [h, w], "counts": str}``.

Collated batch (every view; S = image size, O = most objects of any sample in the batch)::

    "task"          str                       the view that produced the batch
    "key"           list[str]                 sample key (``key#j`` for the j-th item of an
                                              expanded sample)
    "pixels"        float32 (B, 3, S, S)      in [0, 1]
    "object_masks"  bool    (B, O, S, S)      instance masks, padded with False
    "object_valid"  bool    (B, O)            True for real objects
    "boxes"         float32 (B, O, 4)         xyxy pixels in the S x S frame, padded with 0
    "object_names"  list[list[str]]           e.g. "red circle" (COCO: the category name)

plus the fields of the task in `BATCH_FIELDS` (texts are lists of str of length B).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1

TASKS: tuple[str, ...] = ("caption", "vqa", "pope", "rec", "reasonseg", "edit", "t2i", "chat")
"""Tasks read from the annotation's item lists. ``mix`` (a weighted mix of these, one task
per batch) is also accepted."""

IMAGE_VIEW = "image"
"""Every sample as one item with no text: what Stage I reads (pixels and object masks), so
datasets without captions (SA-1B) are not skipped. Not a mix task."""

VIEWS: tuple[str, ...] = (IMAGE_VIEW, *TASKS)
"""Every view the loader reads, besides ``mix``."""

COMMON_FIELDS: tuple[str, ...] = (
    "task",
    "key",
    "pixels",
    "object_masks",
    "object_valid",
    "boxes",
    "object_names",
)

BATCH_FIELDS: dict[str, tuple[str, ...]] = {
    # the image and its objects only (the common fields)
    "image": (),
    # one caption per item (a seeded choice among the sample's captions, or all with expand)
    "caption": ("captions",),
    # question text, canonical answer, the ten VQAv2-style answers, question type
    "vqa": ("questions", "answers", "answer_lists", "question_types"),
    # yes/no object-existence question; pope_splits in {"random","popular","adversarial"}
    "pope": ("questions", "answers", "pope_splits"),
    # referring expression -> one object: target_boxes float32 (B,4) xyxy in the S frame,
    # target_masks bool (B,S,S), target_index int64 (B,) index into the object axis
    "rec": ("expressions", "target_boxes", "target_masks", "target_index"),
    # a query whose object must be inferred; answers = a short explanation
    "reasonseg": ("queries", "answers", "target_boxes", "target_masks", "target_index"),
    # instruction + the edited image target_pixels float32 (B,3,S,S) in [0,1]
    "edit": ("instructions", "edit_ops", "target_pixels"),
    # text-to-image: prompt -> pixels (the image is the target)
    "t2i": ("captions",),
    # multi-turn conversation: list of {"from": "human"|"gpt", "value": str} per item
    "chat": ("conversations",),
}


@dataclass
class ObjectAnn:
    """One object instance. `mask` is the visible region (after occlusion) as RLE."""

    bbox: list[float]
    mask: dict[str, Any] | None = None
    name: str = ""
    category: str = ""
    color: str = ""
    size: str = ""
    center: list[float] = field(default_factory=list)
    corners: int = -1
    z: int = 0
    area: float = 0.0


@dataclass
class VQAItem:
    """A question with its canonical answer and ten VQAv2-style human answers."""

    question: str
    answer: str
    answers: list[str]
    qtype: str


@dataclass
class PopeItem:
    """A POPE-style probe: "Is there a <object> in the image?" -> yes/no."""

    question: str
    answer: str
    split: str
    object: str


@dataclass
class RefItem:
    """A referring expression (REC) or reasoning-segmentation query naming one object."""

    text: str
    object_index: int
    answer: str = ""


@dataclass
class EditItem:
    """An edit: instruction, the operation kind, and the objects of the edited scene.

    The edited image itself is stored as ``{key}.target.png`` (or .jpg) in the tar.
    """

    instruction: str
    op: str
    target_objects: list[ObjectAnn] = field(default_factory=list)


@dataclass
class SampleAnnotation:
    """Everything known about one image; every task list may be empty."""

    key: str
    width: int
    height: int
    source: str = "shapes_world"
    objects: list[ObjectAnn] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    vqa: list[VQAItem] = field(default_factory=list)
    pope: list[PopeItem] = field(default_factory=list)
    rec: list[RefItem] = field(default_factory=list)
    reasonseg: list[RefItem] = field(default_factory=list)
    edit: list[EditItem] = field(default_factory=list)
    t2i: list[str] = field(default_factory=list)
    conversations: list[list[dict[str, str]]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["schema_version"] = SCHEMA_VERSION
        return out

    def to_json(self) -> bytes:
        """Compact, key-sorted JSON bytes: the same annotation always gives the same bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SampleAnnotation:
        """Parse a dict written by `to_dict`; raises ValueError naming a missing field."""
        for name in ("key", "width", "height"):
            if name not in d:
                raise ValueError(f"annotation is missing required field {name!r}")

        def objs(items: list[dict[str, Any]]) -> list[ObjectAnn]:
            return [ObjectAnn(**o) for o in items]

        return cls(
            key=str(d["key"]),
            width=int(d["width"]),
            height=int(d["height"]),
            source=d.get("source", "unknown"),
            objects=objs(d.get("objects", [])),
            captions=list(d.get("captions", [])),
            vqa=[VQAItem(**v) for v in d.get("vqa", [])],
            pope=[PopeItem(**p) for p in d.get("pope", [])],
            rec=[RefItem(**r) for r in d.get("rec", [])],
            reasonseg=[RefItem(**r) for r in d.get("reasonseg", [])],
            edit=[
                EditItem(
                    instruction=e["instruction"],
                    op=e["op"],
                    target_objects=objs(e.get("target_objects", [])),
                )
                for e in d.get("edit", [])
            ],
            t2i=list(d.get("t2i", [])),
            conversations=[list(c) for c in d.get("conversations", [])],
            meta=dict(d.get("meta", {})),
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> SampleAnnotation:
        return cls.from_dict(json.loads(data))

    def check_types(self) -> None:
        """Raise ValueError naming the first field whose value has the wrong type.

        JSON lets a converter write an integer answer or a null caption; the loader would
        then fail (or worse, tokenize "3") far from the cause. Converters call this before a
        sample is written and `check_shards` calls it on every sample it reads.
        """
        _expect("key", self.key, str)
        for name in ("width", "height"):
            value = getattr(self, name)
            _expect(name, value, int)
            if value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        _expect("source", self.source, str)
        _strings("captions", self.captions)
        _strings("t2i", self.t2i)
        for i, o in enumerate(self.objects):
            _check_object(f"objects[{i}]", o)
        for i, q in enumerate(self.vqa):
            where = f"vqa[{i}]"
            for name in ("question", "answer", "qtype"):
                _expect(f"{where}.{name}", getattr(q, name), str)
            _strings(f"{where}.answers", q.answers)
        for i, p in enumerate(self.pope):
            for name in ("question", "answer", "split", "object"):
                _expect(f"pope[{i}].{name}", getattr(p, name), str)
        for task in ("rec", "reasonseg"):
            for i, r in enumerate(getattr(self, task)):
                _expect(f"{task}[{i}].text", r.text, str)
                _expect(f"{task}[{i}].answer", r.answer, str)
                _expect(f"{task}[{i}].object_index", r.object_index, int)
                if not 0 <= r.object_index < len(self.objects):
                    raise ValueError(
                        f"{task}[{i}].object_index: {r.object_index} is not one of the "
                        f"{len(self.objects)} objects"
                    )
        for i, e in enumerate(self.edit):
            _expect(f"edit[{i}].instruction", e.instruction, str)
            _expect(f"edit[{i}].op", e.op, str)
            for j, o in enumerate(e.target_objects):
                _check_object(f"edit[{i}].target_objects[{j}]", o)
        for i, conv in enumerate(self.conversations):
            _expect(f"conversations[{i}]", conv, list)
            for j, turn in enumerate(conv):
                where = f"conversations[{i}][{j}]"
                _expect(where, turn, dict)
                _expect(f"{where}.from", turn.get("from"), str)
                _expect(f"{where}.value", turn.get("value"), str)
        _expect("meta", self.meta, dict)

    def num_items(self, task: str) -> int:
        """How many items this sample offers to a task view (0: the view skips it)."""
        if task == IMAGE_VIEW:
            return 1
        if task == "caption":
            return len(self.captions)
        if task == "t2i":
            return len(self.t2i)
        if task == "chat":
            return len(self.conversations)
        if task in ("vqa", "pope", "rec", "reasonseg", "edit"):
            return len(getattr(self, task))
        raise ValueError(f"task must be one of {VIEWS}, got {task!r}")


def _expect(field_name: str, value: Any, kind: type) -> None:
    # bool is an int subclass: True as a width or an object index is a bug, not a number
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(
            f"{field_name}: expected {kind.__name__}, got {type(value).__name__} {value!r:.60}"
        )


def _strings(field_name: str, values: Any) -> None:
    _expect(field_name, values, list)
    for i, v in enumerate(values):
        _expect(f"{field_name}[{i}]", v, str)


def _check_object(where: str, o: ObjectAnn) -> None:
    _expect(f"{where}.bbox", o.bbox, list)
    if len(o.bbox) != 4 or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in o.bbox
    ):
        raise ValueError(f"{where}.bbox: expected 4 numbers [x0, y0, x1, y1], got {o.bbox!r:.80}")
    if o.mask is not None:
        _expect(f"{where}.mask", o.mask, dict)
        if "size" not in o.mask or "counts" not in o.mask:
            raise ValueError(f"{where}.mask: an RLE needs 'size' and 'counts'")
    for name in ("name", "category", "color", "size"):
        _expect(f"{where}.{name}", getattr(o, name), str)
