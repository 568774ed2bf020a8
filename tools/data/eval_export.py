"""Export the paper's benchmarks from their official files to eval-suite documents.

    python tools/data/eval_export.py BENCHMARK --root DIR --out DATA_ROOT [--images DIR]
    python eval_suite/run.py --adapter ... --tasks TASK... --data-root DATA_ROOT --out runs/x/eval

`--root` holds the benchmark's official files under their official names; `--images` is the
image folder (default: the release's usual folder under --root, named in the README table). Documents go to
DATA_ROOT/data/eval/{task}.jsonl (one benchmark may write several tasks, e.g. RefCOCO's
val/testA/testB); images stay where they are (paths relative to the document file), only
images and masks the official files do not hold as files (MMBench base64 images, ReasonSeg
polygons) are written under DATA_ROOT/data/eval/{benchmark}/. The table of benchmarks, files
and metrics is in packages/setok-eval/README.md.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import io
import pickle
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from setokim.data.eval_common import (
    Documents,
    ExportError,
    field,
    need_file,
    png_bytes,
    read_json,
    read_json_lines,
    record_error,
    text_list,
)


@dataclass(frozen=True)
class Options:
    """What a benchmark exporter gets: the official folder, the image folder, the output root."""

    root: Path
    images: Path
    out: Path
    num: int | None = None
    seed: int = 0


# ---------------------------------------------------------------------------------------- VQA


def _vqa_format(opt: Options, task: str, questions: str, annotations: str | None,
                image_name: Callable[[int], str]) -> dict[str, Path]:  # fmt: skip
    """VQAv2-format files (VQAv2, OK-VQA): {"questions": [...]} + {"annotations": [...]}."""
    qpath = need_file(opt.root / questions, f"{task} questions file")
    apath = (
        None if annotations is None else need_file(opt.root / annotations, f"{task} annotations")
    )
    docs = Documents(opt.out, [qpath] + ([apath] if apath else []))
    qs = field(read_json(qpath, "questions"), "questions", qpath, "<file>", list)
    anns: dict[int, dict[str, Any]] = {}
    if apath is not None:
        for i, a in enumerate(
            field(read_json(apath, "annotations"), "annotations", apath, "<file>", list)
        ):
            anns[field(a, "question_id", apath, f"#{i}", int)] = a
    for i, q in enumerate(qs):
        qid = field(q, "question_id", qpath, f"#{i}", int)
        image_id = field(q, "image_id", qpath, qid, int)
        doc = {
            "id": qid,
            "question_id": qid,
            "image_id": image_id,
            "question": field(q, "question", qpath, qid, str),
            "image": docs.image(opt.images / image_name(image_id), qpath, qid),
        }
        if apath is not None:
            a = anns.pop(qid, None)
            if a is None:
                raise record_error(apath, qid, "question_id", "no annotation for this question")
            if field(a, "image_id", apath, qid, int) != image_id:
                raise record_error(
                    apath, qid, "image_id", f"{a['image_id']} != {image_id} of {qpath.name}"
                )
            doc["answers"] = text_list(a, "answers", apath, qid, "answer")
            doc["answer_type"] = a.get("answer_type", "")
        docs.add(task, doc, qpath)
    if anns:
        raise record_error(apath, next(iter(anns)), "question_id", f"not in {qpath.name}")
    return docs.write()


def export_vqav2_val(opt: Options) -> dict[str, Path]:
    """VQAv2 val2014: ten human answers per question, VQA accuracy."""
    return _vqa_format(opt, "vqav2_val", "v2_OpenEnded_mscoco_val2014_questions.json",
                       "v2_mscoco_val2014_annotations.json", lambda i: f"COCO_val2014_{i:012d}.jpg")  # fmt: skip


def export_vqav2_testdev(opt: Options) -> dict[str, Path]:
    """VQAv2 test-dev2015: questions only (answers are on the EvalAI server)."""
    return _vqa_format(opt, "vqav2_testdev", "v2_OpenEnded_mscoco_test-dev2015_questions.json",
                       None, lambda i: f"COCO_test2015_{i:012d}.jpg")  # fmt: skip


def export_okvqa_val(opt: Options) -> dict[str, Path]:
    """OK-VQA val (VQAv2 format; `answer` of each entry is the processed answer the official
    evaluation compares against, `raw_answer` is not used)."""
    return _vqa_format(opt, "okvqa_val", "OpenEnded_mscoco_val2014_questions.json",
                       "mscoco_val2014_annotations.json", lambda i: f"COCO_val2014_{i:012d}.jpg")  # fmt: skip


def export_gqa_testdev(opt: Options) -> dict[str, Path]:
    """GQA testdev-balanced: {question_id: {imageId, question, answer, ...}}, exact match."""
    path = need_file(opt.root / "testdev_balanced_questions.json", "GQA questions file")
    docs = Documents(opt.out, [path])
    questions = read_json(path, "GQA questions")
    if not isinstance(questions, dict):
        raise ExportError(f"{path}: expected an object keyed by question id")
    for qid, q in questions.items():
        image_id = field(q, "imageId", path, qid, str)
        docs.add("gqa_testdev", {
            "id": qid, "image_id": image_id, "question": field(q, "question", path, qid, str),
            "answer": field(q, "answer", path, qid, str),
            "image": docs.image(opt.images / f"{image_id}.jpg", path, qid),
        }, path)  # fmt: skip
    return docs.write()


def export_vizwiz_val(opt: Options) -> dict[str, Path]:
    """VizWiz val.json: a list of {image, question, answers: [{answer, answer_confidence}]}."""
    path = need_file(opt.root / "val.json", "VizWiz annotations file")
    docs = Documents(opt.out, [path])
    records = read_json(path, "VizWiz annotations")
    if not isinstance(records, list):
        raise ExportError(f"{path}: expected a list of questions")
    for i, r in enumerate(records):
        name = field(r, "image", path, f"#{i}", str)
        rid = Path(name).stem
        docs.add("vizwiz_val", {
            "id": rid, "question": field(r, "question", path, rid, str),
            "answers": text_list(r, "answers", path, rid, "answer"),
            "answer_type": r.get("answer_type", ""), "image": docs.image(opt.images / name, path, rid),
        }, path)  # fmt: skip
    return docs.write()


def export_textvqa_val(opt: Options) -> dict[str, Path]:
    """TextVQA 0.5.1 val: {"data": [{question_id, image_id, question, answers: [str] x10}]}."""
    path = need_file(opt.root / "TextVQA_0.5.1_val.json", "TextVQA annotations file")
    docs = Documents(opt.out, [path])
    for i, r in enumerate(field(read_json(path, "TextVQA"), "data", path, "<file>", list)):
        qid = field(r, "question_id", path, f"#{i}", int)
        image_id = field(r, "image_id", path, qid, str)
        docs.add("textvqa_val", {
            "id": qid, "question_id": qid, "image_id": image_id,
            "question": field(r, "question", path, qid, str),
            "answers": text_list(r, "answers", path, qid, None),
            "image": docs.image(opt.images / f"{image_id}.jpg", path, qid),
        }, path)  # fmt: skip
    return docs.write()


# ---------------------------------------------------------------------- POPE, MME, MMBench

POPE_SPLITS = ("random", "popular", "adversarial")


def export_pope(opt: Options) -> dict[str, Path]:
    """POPE coco_pope_{random,popular,adversarial}.json (JSON lines: question_id, image, text,
    label). One task per split, and `pope` with all three (ids `{split}-{question_id}`)."""
    paths = [need_file(opt.root / f"coco_pope_{s}.json", f"POPE {s} file") for s in POPE_SPLITS]
    docs = Documents(opt.out, paths)
    for split, path in zip(POPE_SPLITS, paths, strict=True):
        for i, r in enumerate(read_json_lines(path, f"POPE {split}")):
            qid = field(r, "question_id", path, f"line {i + 1}", int)
            label = field(r, "label", path, qid, str)
            if label not in ("yes", "no"):
                raise record_error(path, qid, "label", f"must be 'yes' or 'no', got {label!r}")
            doc = {
                "question_id": qid, "question": field(r, "text", path, qid, str), "label": label,
                "split": split, "image": docs.image(opt.images / field(r, "image", path, qid, str), path, qid),
            }  # fmt: skip
            docs.add(f"pope_coco_{split}", {"id": qid, **doc}, path)
            docs.add("pope", {"id": f"{split}-{qid}", **doc}, path)
    return docs.write()


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")  # fmt: skip


def export_mme(opt: Options) -> dict[str, Path]:
    """MME_Benchmark_release_version/{subtask}/: per image a .txt of `question<TAB>Yes|No`
    lines, next to the image or in questions_answers_YN/ with the image in images/.
    Perception -> `mme`, cognition -> `mme_cognition`."""
    folders = {}
    for task, subtasks in (("mme", MME_PERCEPTION), ("mme_cognition", MME_COGNITION)):
        for sub in subtasks:
            folder = opt.root / sub
            if not folder.is_dir():
                raise FileNotFoundError(f"MME subtask folder not found: {folder}")
            qa = folder / "questions_answers_YN"
            txt_dir, img_dir = (qa, folder / "images") if qa.is_dir() else (folder, folder)
            folders[sub] = (task, sorted(txt_dir.glob("*.txt")), img_dir)
    docs = Documents(opt.out, [t for _, txts, _ in folders.values() for t in txts])
    for sub, (task, txts, img_dir) in folders.items():
        if not txts:
            raise ExportError(f"MME subtask {sub}: no question files (*.txt) in {img_dir}")
        for txt in txts:
            images = [
                p
                for p in (img_dir / f"{txt.stem}{e}" for e in (".jpg", ".png", ".jpeg"))
                if p.is_file()
            ]
            if len(images) != 1:
                raise record_error(
                    txt,
                    txt.stem,
                    "image",
                    f"expected one image {txt.stem}.jpg/.png in {img_dir}, found {len(images)}",
                )
            lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
            for k, line in enumerate(lines):
                parts = line.split("\t")
                answer = parts[-1].strip().lower()
                if len(parts) != 2 or answer not in ("yes", "no"):
                    raise record_error(
                        txt,
                        f"line {k + 1}",
                        "answer",
                        f"expected 'question<TAB>Yes|No', got {line!r:.80}",
                    )
                docs.add(task, {
                    "id": f"{sub}/{txt.stem}/{k}", "subtask": sub, "image_id": txt.stem,
                    "question": parts[0].strip(), "answer": answer,
                    "image": docs.image(images[0], txt, txt.stem),
                }, txt)  # fmt: skip
    return docs.write()


MMBENCH_OPTIONS = ("A", "B", "C", "D", "E", "F", "G", "H")


def _absent(value: str | None) -> bool:
    """An empty TSV cell (pandas writes NaN as empty or 'nan')."""
    return value is None or value.strip() in ("", "nan", "NaN")


def export_mmbench_dev(opt: Options) -> dict[str, Path]:
    """MMBench dev TSV (index, question, hint, A..E, answer, category, l2-category, image as
    base64, or the index of the row whose image it shares). Each row is one document; the
    question field holds hint, question and the options as 'A. ...' lines."""
    path = opt.root if opt.root.is_file() else None
    if path is None:
        tsvs = sorted(opt.root.glob("*.tsv")) if opt.root.is_dir() else []
        if len(tsvs) != 1:
            raise FileNotFoundError(
                f"--root must be the MMBench .tsv or a folder with one, found {[p.name for p in tsvs]} in {opt.root}"
            )
        path = tsvs[0]
    docs = Documents(opt.out, [path])
    csv.field_size_limit(1 << 30)
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows or "answer" not in rows[0]:
        raise ExportError(
            f"{path}: no 'answer' column (the test split is scored by the MMBench server; export the dev split)"
        )
    by_index = {}
    for i, r in enumerate(rows):
        rid = r.get("index") or f"row {i + 2}"
        if not (r.get("index") or "").strip().lstrip("-").isdigit():
            raise record_error(path, rid, "index", "must be an integer")
        if r["index"].strip() in by_index:
            raise record_error(path, rid, "index", "appears twice")
        by_index[r["index"].strip()] = r
    written: dict[str, str] = {}

    def image(idx: str, depth: int = 0) -> str:
        if idx in written:
            return written[idx]
        cell = (by_index[idx].get("image") or "").strip()
        if cell.isdigit() and len(cell) < 16:  # a row that shares another row's image
            if cell not in by_index or depth > 1:
                raise record_error(path, idx, "image", f"refers to row {cell}, which has no image")
            written[idx] = image(cell, depth + 1)
            return written[idx]
        try:
            data = base64.b64decode(cell, validate=True)
            with Image.open(io.BytesIO(data)) as im:
                ext = {"JPEG": "jpg", "PNG": "png"}.get(str(im.format), "png")
                if ext == "png" and im.format != "PNG":
                    data = png_bytes(np.asarray(im.convert("RGB")))
        except (binascii.Error, ValueError, OSError) as exc:
            raise record_error(path, idx, "image", f"not a base64 image: {exc}") from exc
        written[idx] = docs.asset(f"mmbench/images/{idx}.{ext}", data)
        return written[idx]

    for idx, r in by_index.items():
        options = {k: r[k].strip() for k in MMBENCH_OPTIONS if not _absent(r.get(k))}
        answer = (r.get("answer") or "").strip()
        if answer not in options:
            raise record_error(
                path, idx, "answer", f"{answer!r} is not one of the options {sorted(options)}"
            )
        question = field(r, "question", path, idx, str).strip()
        hint = r.get("hint")
        text = ("" if _absent(hint) else f"{hint.strip()}\n") + question
        text += "".join(f"\n{k}. {v}" for k, v in options.items())
        docs.add("mmbench_dev", {
            "id": int(idx), "question": text, "answer": answer, "options": options,
            "category": r.get("category", ""), "l2_category": r.get("l2-category", ""),
            "circular_group": int(idx) % 1_000_000, "image": image(idx),
        }, path)  # fmt: skip
    return docs.write()


# -------------------------------------------------------------------- grounding, segmentation

REFCOCO = {  # benchmark: (folder task prefix, refs pickle, splits)
    "refcoco": ("refcoco", "refs(unc).p", ("val", "testA", "testB")),
    "refcoco_plus": ("refcoco_plus", "refs(unc).p", ("val", "testA", "testB")),
    "refcocog": ("refcocog", "refs(umd).p", ("val", "test")),
}


def _export_refcoco(opt: Options, benchmark: str) -> dict[str, Path]:
    """refs(unc|umd).p (list of {ref_id, ann_id, image_id, split, sentences: [{sent_id, sent}]})
    + instances.json (COCO): one document per sentence, box = the referred instance's xywh."""
    prefix, refs_name, splits = REFCOCO[benchmark]
    refs_path = need_file(opt.root / refs_name, f"{benchmark} refs pickle")
    inst_path = need_file(opt.root / "instances.json", f"{benchmark} instances file")
    docs = Documents(opt.out, [refs_path, inst_path])
    try:
        with open(refs_path, "rb") as handle:
            refs = pickle.load(handle)  # noqa: S301 - the benchmark's own file format
    except (pickle.UnpicklingError, EOFError) as exc:
        raise ExportError(f"{refs_path}: not a refs pickle: {exc}") from exc
    inst = read_json(inst_path, "COCO instances")
    images = {
        field(im, "id", inst_path, "images", int): im
        for im in field(inst, "images", inst_path, "<file>", list)
    }
    anns = {
        field(a, "id", inst_path, "annotations", int): a
        for a in field(inst, "annotations", inst_path, "<file>", list)
    }
    if not isinstance(refs, list):
        raise ExportError(
            f"{refs_path}: expected a pickled list of refs, got {type(refs).__name__}"
        )
    for i, r in enumerate(refs):
        ref_id = field(r, "ref_id", refs_path, f"#{i}", int)
        if field(r, "split", refs_path, ref_id, str) not in splits:
            continue
        split = r["split"]
        ann_id = field(r, "ann_id", refs_path, ref_id, int)
        image_id = field(r, "image_id", refs_path, ref_id, int)
        if ann_id not in anns:
            raise record_error(refs_path, ref_id, "ann_id", f"{ann_id} is not in {inst_path.name}")
        if image_id not in images or anns[ann_id].get("image_id") != image_id:
            raise record_error(
                refs_path,
                ref_id,
                "image_id",
                f"{image_id} is not the image of annotation {ann_id} in {inst_path.name}",
            )
        box = field(anns[ann_id], "bbox", inst_path, ann_id, list)
        if (
            len(box) != 4
            or not all(isinstance(v, int | float) for v in box)
            or box[2] <= 0
            or box[3] <= 0
        ):
            raise record_error(
                inst_path, ann_id, "bbox", f"expected [x, y, w, h] with w, h > 0, got {box}"
            )
        im = images[image_id]
        path = docs.image(
            opt.images / field(im, "file_name", inst_path, image_id, str), refs_path, ref_id
        )
        sentences = field(r, "sentences", refs_path, ref_id, list)
        if not sentences:
            raise record_error(refs_path, ref_id, "sentences", "is an empty list")
        for s in sentences:
            sent_id = field(s, "sent_id", refs_path, ref_id, int)
            docs.add(f"{prefix}_{split}", {
                "id": f"{ref_id}-{sent_id}", "ref_id": ref_id, "ann_id": ann_id, "image_id": image_id,
                "expression": field(s, "sent", refs_path, f"{ref_id}-{sent_id}", str),
                "box": [float(v) for v in box], "box_format": "xywh",
                "width": im.get("width"), "height": im.get("height"), "image": path,
            }, refs_path)  # fmt: skip
    missing = [s for s in splits if f"{prefix}_{s}" not in docs.docs]
    if missing:
        raise ExportError(
            f"{refs_path}: no refs of split(s) {missing} (a {benchmark} refs file has {list(splits)})"
        )
    return docs.write()


def _polygon_mask(width: int, height: int, shapes: list[Any], path: Path, rid: str) -> np.ndarray:
    """LISA's ReasonSeg mask: polygons drawn largest first (integer points, outline and fill);
    'flag' shapes skipped, 'ignore' shapes -> 255, all others target (1)."""
    drawn = []
    for k, s in enumerate(shapes):
        label = field(s, "label", path, rid, str).lower()
        if label == "flag":
            continue
        pts = field(s, "points", path, rid, list)
        try:
            xy = [(int(p[0]), int(p[1])) for p in pts]
        except (TypeError, ValueError, IndexError) as exc:
            raise record_error(path, rid, f"shapes[{k}].points", "expected [[x, y], ...]") from exc
        if len(xy) < 3:
            raise record_error(path, rid, f"shapes[{k}].points", "a polygon needs 3 points")
        alone = Image.new("L", (width, height))
        ImageDraw.Draw(alone).polygon(xy, fill=1, outline=1)
        drawn.append((int(np.asarray(alone).sum()), 255 if "ignore" in label else 1, xy))
    canvas = Image.new("L", (width, height))
    for _, value, xy in sorted(drawn, key=lambda d: -d[0]):
        ImageDraw.Draw(canvas).polygon(xy, fill=value, outline=value)
    return np.asarray(canvas)


def export_reasonseg_val(opt: Options) -> dict[str, Path]:
    """ReasonSeg val/: {name}.jpg + {name}.json ({text: [..], is_sentence, shapes: [{label,
    points}]}). One document per image with its first text, as LISA evaluates; the mask PNG
    holds the target region (LISA's 'ignore' regions count as background here: the suite's
    gIoU/cIoU have no ignore label)."""
    folder = opt.root / "val"
    jsons = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not jsons:
        raise FileNotFoundError(f"ReasonSeg val folder with *.json files not found: {folder}")
    docs = Documents(opt.out, jsons)
    for path in jsons:
        rid = path.stem
        rec = read_json(path, "ReasonSeg annotation")
        texts = field(rec, "text", path, rid, (list, str))
        texts = [texts] if isinstance(texts, str) else texts
        if not texts or not isinstance(texts[0], str) or not texts[0].strip():
            raise record_error(path, rid, "text", "needs at least one non-empty string")
        is_sentence = field(rec, "is_sentence", path, rid, bool)
        images = [p for p in (opt.images / f"{rid}{e}" for e in (".jpg", ".png")) if p.is_file()]
        if not images:
            raise record_error(path, rid, "image", f"{rid}.jpg not found in {opt.images}")
        with Image.open(images[0]) as im:
            width, height = im.size
        mask = _polygon_mask(width, height, field(rec, "shapes", path, rid, list), path, rid)
        if not (mask == 1).any():
            raise record_error(path, rid, "shapes", "no target polygon")
        text = texts[0].strip()
        docs.add("reasonseg_val", {
            "id": rid, "expression": text if is_sentence else f"What is {text} in this image?",
            "is_sentence": is_sentence, "image": docs.image(images[0], path, rid),
            "mask": docs.asset(f"reasonseg/masks/{rid}.png", png_bytes(((mask == 1) * 255).astype(np.uint8))),
        }, path)  # fmt: skip
    return docs.write()


# ------------------------------------------------------------------ captions, generation, edit


def export_flickr30k_test(opt: Options) -> dict[str, Path]:
    """Karpathy dataset_flickr30k.json: images with split 'test', references = raw sentences."""
    path = need_file(opt.root / "dataset_flickr30k.json", "Flickr30K Karpathy split file")
    docs = Documents(opt.out, [path])
    for i, im in enumerate(
        field(read_json(path, "Karpathy split"), "images", path, "<file>", list)
    ):
        name = field(im, "filename", path, f"#{i}", str)
        if field(im, "split", path, name, str) != "test":
            continue
        docs.add("flickr30k_test", {
            "id": Path(name).stem, "references": text_list(im, "sentences", path, name, "raw"),
            "image": docs.image(opt.images / name, path, name),
        }, path)  # fmt: skip
    return docs.write()


def _coco_captions(
    path: Path, what: str
) -> tuple[dict[int, dict[str, Any]], dict[int, list[dict[str, Any]]]]:
    """COCO-format captions file: images by id and their caption annotations (sorted by id)."""
    data = read_json(path, what)
    images = {
        field(im, "id", path, "images", int): im
        for im in field(data, "images", path, "<file>", list)
    }
    caps: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for a in field(data, "annotations", path, "<file>", list):
        aid = field(a, "id", path, "annotations", int)
        image_id = field(a, "image_id", path, aid, int)
        if image_id not in images:
            raise record_error(path, aid, "image_id", f"{image_id} is not in 'images'")
        field(a, "caption", path, aid, str)
        caps[image_id].append(a)
    for v in caps.values():
        v.sort(key=lambda a: a["id"])
    return images, caps


def export_nocaps_val(opt: Options) -> dict[str, Path]:
    """nocaps_val_4500_captions.json (COCO format, images with `domain`): ten references each."""
    path = need_file(opt.root / "nocaps_val_4500_captions.json", "NoCaps captions file")
    docs = Documents(opt.out, [path])
    images, caps = _coco_captions(path, "NoCaps captions")
    for image_id, im in images.items():
        if not caps[image_id]:
            raise record_error(path, image_id, "annotations", "image has no captions")
        docs.add("nocaps_val", {
            "id": image_id, "domain": im.get("domain", ""),
            "references": [a["caption"] for a in caps[image_id]],
            "image": docs.image(opt.images / field(im, "file_name", path, image_id, str), path, image_id),
        }, path)  # fmt: skip
    return docs.write()


def export_coco30k_t2i(opt: Options) -> dict[str, Path]:
    """COCO-30K: `--num` (30,000) val2014 images drawn with `--seed`, one caption each (also
    drawn), the real image as the FID / CLIP target."""
    num = 30_000 if opt.num is None else opt.num
    path = need_file(opt.root / "captions_val2014.json", "COCO captions file")
    docs = Documents(opt.out, [path], {"num": num, "seed": opt.seed})
    images, caps = _coco_captions(path, "COCO captions")
    pool = sorted(i for i in images if caps[i])
    if num > len(pool):
        raise ExportError(f"{path}: --num {num} but only {len(pool)} images have captions")
    rng = np.random.default_rng(opt.seed)
    for image_id in sorted(rng.choice(pool, size=num, replace=False).tolist()):
        cap = caps[image_id][int(rng.integers(len(caps[image_id])))]
        name = field(images[image_id], "file_name", path, image_id, str)
        docs.add("coco30k_t2i", {
            "id": image_id, "caption_id": cap["id"], "caption": cap["caption"].strip(),
            "target": docs.image(opt.images / name, path, image_id, "target"),
        }, path)  # fmt: skip
    return docs.write()


def export_magicbrush_test(opt: Options) -> dict[str, Path]:
    """MagicBrush test: edit_sessions.json ({img_id: [{input, mask, output, instruction}]}),
    images/{img_id}/; one document per turn, the turn's own input (single-turn setting)."""
    path = need_file(opt.root / "edit_sessions.json", "MagicBrush edit_sessions.json")
    docs = Documents(opt.out, [path])
    sessions = read_json(path, "MagicBrush sessions")
    if not isinstance(sessions, dict):
        raise ExportError(f"{path}: expected an object keyed by img_id")
    for img_id, turns in sessions.items():
        if not isinstance(turns, list) or not turns:
            raise record_error(path, img_id, "turns", "expected a non-empty list of turns")
        for t, turn in enumerate(turns, start=1):
            rid = f"{img_id}-{t}"
            folder = opt.images / img_id
            docs.add("magicbrush_test", {
                "id": rid, "img_id": img_id, "turn": t,
                "instruction": field(turn, "instruction", path, rid, str),
                "image": docs.image(folder / field(turn, "input", path, rid, str), path, rid),
                "target": docs.image(folder / field(turn, "output", path, rid, str), path, rid, "output"),
            }, path)  # fmt: skip
    return docs.write()


@dataclass(frozen=True)
class Benchmark:
    """A CLI entry: the exporter and the image folder it uses by default (under --root)."""

    export: Callable[[Options], dict[str, Path]]
    images: str


BENCHMARKS: Mapping[str, Benchmark] = {
    "vqav2_val": Benchmark(export_vqav2_val, "val2014"),
    "vqav2_testdev": Benchmark(export_vqav2_testdev, "test2015"),
    "gqa_testdev": Benchmark(export_gqa_testdev, "images"),
    "okvqa_val": Benchmark(export_okvqa_val, "val2014"),
    "vizwiz_val": Benchmark(export_vizwiz_val, "val"),
    "textvqa_val": Benchmark(export_textvqa_val, "train_images"),
    "pope": Benchmark(export_pope, "val2014"),
    "mme": Benchmark(export_mme, "."),
    "mmbench_dev": Benchmark(export_mmbench_dev, "."),
    **{name: Benchmark(lambda o, n=name: _export_refcoco(o, n), "train2014") for name in REFCOCO},
    "reasonseg_val": Benchmark(export_reasonseg_val, "val"),
    "flickr30k_test": Benchmark(export_flickr30k_test, "flickr30k-images"),
    "nocaps_val": Benchmark(export_nocaps_val, "validation"),
    "coco30k_t2i": Benchmark(export_coco30k_t2i, "val2014"),
    "magicbrush_test": Benchmark(export_magicbrush_test, "images"),
}


def export_benchmark(
    name: str, root: str | Path, out: str | Path, images: str | Path | None = None,
    num: int | None = None, seed: int = 0,
) -> dict[str, Path]:  # fmt: skip
    """Export benchmark `name` from the official files under `root`; returns {task: jsonl}."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    root = Path(root)
    image_dir = Path(images) if images is not None else root / bench.images
    return bench.export(Options(root, image_dir, Path(out), num, seed))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    parser.add_argument(
        "--root", required=True, help="folder with the official files (MMBench: the .tsv)"
    )
    parser.add_argument("--out", required=True, help="data root; documents go to OUT/data/eval/")
    parser.add_argument(
        "--images", default=None, help="image folder (default: per benchmark, under --root)"
    )
    parser.add_argument(
        "--num", type=int, default=None, help="coco30k_t2i: number of images (30000)"
    )
    parser.add_argument("--seed", type=int, default=0, help="coco30k_t2i: sampling seed")
    a = parser.parse_args(argv)
    try:
        paths = export_benchmark(a.benchmark, a.root, a.out, a.images, a.num, a.seed)
    except (ExportError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for task, path in paths.items():
        with open(path, encoding="utf-8") as handle:
            print(f"{task}: {sum(1 for _ in handle)} documents -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
