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

from setokim.data.converters.coco import load_json
from setokim.data.converters.common import Converted, read_image, write_split
from setokim.data.schema import SampleAnnotation, VQAItem
from setokim.data.shards import safe_key


def iter_vqav2(
    image_dir: str | Path,
    questions_json: str | Path,
    annotations_json: str | Path | None,
    coco_split: str,
) -> Iterator[Converted]:
    qs = load_json(questions_json)["questions"]
    answers = {
        a["question_id"]: a for a in (load_json(annotations_json) or {}).get("annotations", [])
    }
    by_image: dict[int, list[VQAItem]] = defaultdict(list)
    for q in sorted(qs, key=lambda q: q["question_id"]):
        a = answers.get(q["question_id"])
        if a is None and annotations_json is not None:
            raise ValueError(
                f"question_id {q['question_id']} has no annotation in {annotations_json}"
            )
        ten = [x["answer"] for x in a["answers"]] if a else []
        best = a["multiple_choice_answer"] if a else ""
        qtype = a.get("answer_type", "other") if a else "unknown"
        by_image[q["image_id"]].append(VQAItem(q["question"], best, ten, qtype))
    for image_id in sorted(by_image):
        data, ext, w, h = read_image(Path(image_dir) / f"COCO_{coco_split}2014_{image_id:012d}.jpg")
        ann = SampleAnnotation(
            key=f"vqav2-{image_id:012d}",
            width=w,
            height=h,
            source="vqav2",
            vqa=by_image[image_id],
            meta={"image_id": image_id},
        )
        yield Converted(ann, data, ext)


def iter_gqa(image_dir: str | Path, questions_json: str | Path) -> Iterator[Converted]:
    qs = load_json(questions_json)
    by_image: dict[str, list[VQAItem]] = defaultdict(list)
    for qid in sorted(qs):
        q = qs[qid]
        answer = q.get("answer", "")
        qtype = q.get("types", {}).get("structural", "unknown")
        by_image[q["imageId"]].append(
            VQAItem(q["question"], answer, [answer] * 10 if answer else [], qtype)
        )
    for image_id in sorted(by_image):
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
) -> dict[str, Any]:  # fmt: skip
    """Convert VQAv2 (annotations optional: test questions have none)."""
    it = iter_vqav2(image_dir, questions_json, annotations_json, coco_split)
    return write_split(
        out_dir, split, it, source="vqav2", samples_per_shard=samples_per_shard, progress=progress
    )


def convert_gqa(
    image_dir: str | Path, out_dir: str | Path, split: str, *, questions_json: str | Path,
    samples_per_shard: int = 1000, progress: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Convert GQA balanced questions."""
    it = iter_gqa(image_dir, questions_json)
    return write_split(
        out_dir, split, it, source="gqa", samples_per_shard=samples_per_shard, progress=progress
    )
