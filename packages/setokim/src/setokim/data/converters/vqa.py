"""VQAv2 and GQA question files -> shards (one sample per image, all its questions).

VQAv2: ``v2_OpenEnded_mscoco_{split}2014_questions.json`` ({"questions": [{image_id,
question, question_id}]}) + ``v2_mscoco_{split}2014_annotations.json`` ({"annotations":
[{question_id, answer_type, multiple_choice_answer, answers: [{answer, ...}] x10}]});
images ``COCO_{split}2014_{image_id:012d}.jpg``.
GQA balanced: ``{split}_balanced_questions.json`` ({qid: {imageId, question, answer,
types: {structural, semantic, detailed}}}); images ``{imageId}.jpg``. GQA has one answer;
it is repeated ten times so VQA accuracy equals exact match.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from setokim.data.converters.common import (
    Converted,
    Records,
    load_json,
    read_image,
    require,
    write_split,
)
from setokim.data.schema import SampleAnnotation, VQAItem
from setokim.data.shards import safe_key


def _top(d: Any, name: str, path: str | Path) -> list[Any]:
    if not isinstance(d, dict) or not isinstance(d.get(name), list):
        raise ValueError(f"{path}: expected a JSON object whose {name!r} is a list")
    return d[name]


def iter_vqav2(
    image_dir: str | Path,
    questions_json: str | Path,
    annotations_json: str | Path | None,
    coco_split: str,
    records: Records | None = None,
) -> Iterator[Converted]:
    """One sample per image with all its questions (official files; errors name the file,
    the question_id and the field; answers must be strings, as the official files have)."""
    records = records or Records()
    qs = _top(load_json(questions_json), "questions", questions_json)
    answers: dict[int, dict[str, Any]] = {}
    skipped: set[Any] = set()
    if annotations_json is not None:
        for a in _top(load_json(annotations_json), "annotations", annotations_json):
            qid = a.get("question_id") if isinstance(a, dict) else None
            with records.record(annotations_json, f"question_id {qid}"):
                require(a, "question_id", int)
                require(a, "multiple_choice_answer", str)
                for k, x in enumerate(require(a, "answers", list)):
                    if not isinstance(require(x, "answer", str), str):
                        raise TypeError(f"answers[{k}].answer must be a string")
                if "answer_type" in a:
                    require(a, "answer_type", str)
                answers[a["question_id"]] = a
            if qid not in answers:
                skipped.add(qid)  # reported once, here; its question goes with it
    by_image: dict[int, list[VQAItem]] = defaultdict(list)
    checked: list[dict[str, Any]] = []
    for q in qs:
        qid = q.get("question_id") if isinstance(q, dict) else None
        if qid in skipped:
            continue
        with records.record(questions_json, f"question_id {qid}"):
            require(q, "question_id", int)
            require(q, "image_id", int)
            require(q, "question", str)
            if annotations_json is not None and q["question_id"] not in answers:
                raise ValueError(f"has no annotation in {annotations_json}")
            checked.append(q)
    for q in sorted(checked, key=lambda q: q["question_id"]):
        a = answers.get(q["question_id"])
        ten = [x["answer"] for x in a["answers"]] if a else []
        best = a["multiple_choice_answer"] if a else ""
        qtype = a.get("answer_type", "other") if a else "unknown"
        by_image[q["image_id"]].append(VQAItem(q["question"], best, ten, qtype))
    for image_id in sorted(by_image):
        path = Path(image_dir) / f"COCO_{coco_split}2014_{image_id:012d}.jpg"
        with records.record(questions_json, f"image_id {image_id}"):
            data, ext, w, h = read_image(path)
            ann = SampleAnnotation(
                key=f"vqav2-{image_id:012d}",
                width=w,
                height=h,
                source="vqav2",
                vqa=by_image[image_id],
                meta={"image_id": image_id},
            )
            yield Converted(ann, data, ext)


def iter_gqa(
    image_dir: str | Path, questions_json: str | Path, records: Records | None = None
) -> Iterator[Converted]:
    """GQA balanced questions ({qid: {imageId, question, answer?, types?}})."""
    records = records or Records()
    qs = load_json(questions_json)
    if not isinstance(qs, dict):
        raise ValueError(f"{questions_json}: expected a JSON object of question id -> question")
    by_image: dict[str, list[VQAItem]] = defaultdict(list)
    for qid in sorted(qs):
        q = qs[qid]
        with records.record(questions_json, f"question id {qid}"):
            image_id = require(q, "imageId", str)
            question = require(q, "question", str)
            answer = require(q, "answer", str) if "answer" in q else ""
            types = require(q, "types", dict) if "types" in q else {}
            qtype = types.get("structural", "unknown")
            if not isinstance(qtype, str):
                raise TypeError(f"field 'types.structural': expected str, got {qtype!r}")
            by_image[image_id].append(
                VQAItem(question, answer, [answer] * 10 if answer else [], qtype)
            )
    for image_id in sorted(by_image):
        with records.record(questions_json, f"imageId {image_id}"):
            data, ext, w, h = read_image(Path(image_dir) / f"{image_id}.jpg")
            ann = SampleAnnotation(
                key=safe_key(f"gqa-{image_id}"),
                width=w,
                height=h,
                source="gqa",
                vqa=by_image[image_id],
                meta={"image_id": image_id},
            )
            yield Converted(ann, data, ext)


def convert_vqav2(
    image_dir: str | Path, out_dir: str | Path, split: str, *, questions_json: str | Path,
    annotations_json: str | Path | None = None, coco_split: str = "val", samples_per_shard: int = 1000, progress: bool = False,
    overwrite: bool = False, skip_bad: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Convert VQAv2 (annotations optional: test questions have none)."""
    records = Records(skip_bad)
    it = iter_vqav2(image_dir, questions_json, annotations_json, coco_split, records)
    return write_split(
        out_dir, split, it, source="vqav2", samples_per_shard=samples_per_shard, progress=progress,
        overwrite=overwrite, records=records,
    )  # fmt: skip


def convert_gqa(
    image_dir: str | Path, out_dir: str | Path, split: str, *, questions_json: str | Path,
    samples_per_shard: int = 1000, progress: bool = False, overwrite: bool = False,
    skip_bad: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Convert GQA balanced questions."""
    records = Records(skip_bad)
    it = iter_gqa(image_dir, questions_json, records)
    return write_split(
        out_dir, split, it, source="gqa", samples_per_shard=samples_per_shard, progress=progress,
        overwrite=overwrite, records=records,
    )  # fmt: skip
