"""Tiny files in the official VQAv2 layout (JPEG images, question and annotation JSON).

What the tests and the README's "bring your own data" walk-through convert, so the whole
path (convert -> check -> train -> evaluate) runs without downloading VQAv2. The layout is
the official one: ``COCO_{coco_split}2014_{image_id:012d}.jpg``,
``v2_OpenEnded_mscoco_{coco_split}2014_questions.json`` ({"info", "task_type", "data_type",
"data_subtype", "license", "questions": [{image_id, question, question_id}]}) and
``v2_mscoco_{coco_split}2014_annotations.json`` ({"annotations": [{question_id, image_id,
question_type, answer_type, multiple_choice_answer, answers: 10 x {answer,
answer_confidence, answer_id}}]}). Every image shows one coloured square on a grey
background; its questions ask the colour (other), whether it is red (yes/no) and how many
squares there are (number), so the answers follow from the pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220)}


@dataclass(frozen=True)
class FakeVQAv2:
    """Where `write_fake_vqav2` put one split's files."""

    images: Path
    questions: Path
    annotations: Path
    coco_split: str


def write_fake_vqav2(
    root: str | Path,
    coco_split: str,
    num_images: int,
    *,
    first_image_id: int = 1,
    size: int = 48,
    seed: int = 0,
) -> FakeVQAv2:
    """Write `num_images` JPEGs with three questions each under `root/coco_split`."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    rng = np.random.default_rng([seed, first_image_id])
    folder = Path(root) / coco_split
    images = folder / f"{coco_split}2014"
    images.mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    names = sorted(COLORS)
    for n in range(num_images):
        image_id = first_image_id + n
        color = names[int(rng.integers(len(names)))]
        arr = np.full((size, size, 3), 128, dtype=np.uint8)
        x, y = (int(v) for v in rng.integers(0, size // 2, 2))
        arr[y : y + size // 2, x : x + size // 2] = COLORS[color]
        path = images / f"COCO_{coco_split}2014_{image_id:012d}.jpg"
        Image.fromarray(arr).save(path, format="JPEG", quality=95)
        asks = [
            ("What color is the square?", "what color is the", "other", color),
            ("Is the square red?", "is the", "yes/no", "yes" if color == "red" else "no"),
            ("How many squares are there?", "how many", "number", "1"),
        ]
        for k, (question, qtype, atype, answer) in enumerate(asks):
            qid = image_id * 10 + k
            questions.append({"image_id": image_id, "question": question, "question_id": qid})
            answers = [
                {"answer": answer, "answer_confidence": "yes", "answer_id": j + 1}
                for j in range(10)
            ]
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "question_type": qtype,
                    "answer_type": atype,
                    "multiple_choice_answer": answer,
                    "answers": answers,
                }
            )
    head = {
        "info": {"description": "fake VQAv2"},
        "license": {},
        "data_subtype": f"{coco_split}2014",
    }
    qfile = folder / f"v2_OpenEnded_mscoco_{coco_split}2014_questions.json"
    afile = folder / f"v2_mscoco_{coco_split}2014_annotations.json"
    qfile.write_text(
        json.dumps(
            head | {"task_type": "Open-Ended", "data_type": "mscoco", "questions": questions}
        )
    )
    afile.write_text(json.dumps(head | {"data_type": "mscoco", "annotations": annotations}))
    return FakeVQAv2(images, qfile, afile, coco_split)
