"""tools/data/eval_export.py: tiny fake files in each benchmark's official format -> documents
that the eval suite's own task loader reads and its metrics score (a right and a wrong
prediction per benchmark), and bad records named by file, record id and field."""

from __future__ import annotations

import base64
import csv
import importlib.util
import io
import json
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from setok_eval import load_tasks
from setok_eval.codec import encode_labels
from setok_eval.documents import load_documents, load_label_map
from setok_eval.metrics.grounding import xywh_to_xyxy
from setok_eval.metrics.image import ProjectionExtractor
from setok_eval.scoring import score_task
from setokim.data.eval_common import ExportError

REPO = Path(__file__).resolve().parents[1]
# The exporter is a CLI script, not a package module: loaded from its file as `python` runs it.
_spec = importlib.util.spec_from_file_location("eval_export", REPO / "tools/data/eval_export.py")
eval_export = importlib.util.module_from_spec(_spec)
sys.modules["eval_export"] = eval_export  # as importlib does: dataclasses look their module up there
_spec.loader.exec_module(eval_export)
BENCHMARKS, export_benchmark, main = eval_export.BENCHMARKS, eval_export.export_benchmark, eval_export.main

TASKS_DIR = REPO / "eval_suite" / "tasks"
RNG = np.random.default_rng(0)


def jpg(path: Path, size: tuple[int, int] = (12, 10), fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, fmt)
    return path


def dump(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


# ------------------------------------------------------------------ official-format fake files


def ten(answer: str) -> list[dict[str, Any]]:
    """Ten human answers as VQAv2 annotations hold them (one dissenter)."""
    raw = [answer] * 9 + ["something else"]
    return [
        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(raw)
    ]


def fake_vqa(root: Path, questions: str, annotations: str | None, image_fmt: str) -> None:
    qs, anns = [], []
    for image_id, qid, ans in ((42, 42000, "2"), (42, 42001, "red"), (7, 7000, "yes")):
        jpg(root / image_fmt.format(image_id))
        qs.append({"image_id": image_id, "question": f"q{qid}?", "question_id": qid})
        anns.append({"question_type": "what", "multiple_choice_answer": ans, "answers": ten(ans),
                     "image_id": image_id, "answer_type": "other", "question_id": qid})  # fmt: skip
    dump(root / questions, {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                            "license": {}, "data_subtype": "val2014", "questions": qs})  # fmt: skip
    if annotations:
        dump(
            root / annotations,
            {"info": {}, "license": {}, "data_subtype": "val2014", "annotations": anns},
        )


def fake_vqav2_val(root: Path) -> None:
    fake_vqa(root, "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json",
             "val2014/COCO_val2014_{:012d}.jpg")  # fmt: skip


def fake_vqav2_testdev(root: Path) -> None:
    fake_vqa(
        root,
        "v2_OpenEnded_mscoco_test-dev2015_questions.json",
        None,
        "test2015/COCO_test2015_{:012d}.jpg",
    )


def fake_okvqa_val(root: Path) -> None:
    fake_vqa(root, "OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json",
             "val2014/COCO_val2014_{:012d}.jpg")  # fmt: skip
    path = root / "mscoco_val2014_annotations.json"
    data = json.loads(path.read_text())
    for a in data["annotations"]:  # OK-VQA: processed `answer` next to `raw_answer`
        for x in a["answers"]:
            x["raw_answer"] = x["answer"] + "s"
    dump(path, data)


def fake_gqa_testdev(root: Path) -> None:
    qs = {}
    for qid, image, ans in (("201307251", "n15740", "left"), ("20968379", "n288870", "no")):
        jpg(root / "images" / f"{image}.jpg")
        qs[qid] = {"semantic": [], "entailed": [], "equivalent": [qid], "question": f"q{qid}?",
                   "imageId": image, "isBalanced": True, "groups": {"global": None, "local": "x"},
                   "answer": ans, "semanticStr": "", "annotations": {}, "types": {"structural": "verify"},
                   "fullAnswer": f"It is {ans}."}  # fmt: skip
    dump(root / "testdev_balanced_questions.json", qs)


def fake_vizwiz_val(root: Path) -> None:
    recs = []
    for i, ans in enumerate(("unanswerable", "soup")):
        name = f"VizWiz_val_{i:08d}.jpg"
        jpg(root / "val" / name)
        recs.append({"image": name, "question": "What is this?", "answers": ten(ans)[:10],
                     "answer_type": "other", "answerable": int(ans != "unanswerable")})  # fmt: skip
    dump(root / "val.json", recs)


def fake_textvqa_val(root: Path) -> None:
    data = []
    for qid, image_id, ans in (
        (34602, "003a8ae2ef43b901", "nokia"),
        (34603, "0054c91397f2fe05", "5"),
    ):
        jpg(root / "train_images" / f"{image_id}.jpg")
        data.append({"question": "what brand?", "image_id": image_id, "image_classes": ["Phone"],
                     "flickr_original_url": "", "flickr_300k_url": "", "image_width": 12,
                     "image_height": 10, "answers": [ans] * 9 + ["other"], "question_tokens": ["what"],
                     "question_id": qid, "set_name": "val"})  # fmt: skip
    dump(root / "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name": "textvqa",
                                           "dataset_version": "0.5.1", "data": data})  # fmt: skip


def fake_pope(root: Path) -> None:
    for split in ("random", "popular", "adversarial"):
        lines = []
        for qid, (image_id, obj, label) in enumerate(
            ((310196, "snowboard", "yes"), (210789, "dog", "no")), start=1
        ):
            name = f"COCO_val2014_{image_id:012d}.jpg"
            if not (root / "val2014" / name).is_file():
                jpg(root / "val2014" / name)
            lines.append(json.dumps({"question_id": qid, "image": name,
                                     "text": f"Is there a {obj} in the image?", "label": label}))  # fmt: skip
        (root / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")


def fake_mme(root: Path) -> None:
    MME_COGNITION, MME_PERCEPTION = eval_export.MME_COGNITION, eval_export.MME_PERCEPTION

    for k, sub in enumerate(MME_PERCEPTION + MME_COGNITION):
        folder = root / sub
        split = sub in ("artwork", "celebrity", "landmark", "posters", "scene")
        for j in range(2):
            stem = f"{k:03d}{j}"
            jpg((folder / "images" if split else folder) / f"{stem}.jpg")
            txt = (folder / "questions_answers_YN" if split else folder) / f"{stem}.txt"
            txt.parent.mkdir(parents=True, exist_ok=True)
            txt.write_text("Is this a cat? Please answer yes or no.\tYes\n"
                           "Is this a dog? Please answer yes or no.\tNo\n")  # fmt: skip


def b64_image(fmt: str) -> str:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def fake_mmbench_dev(root: Path) -> None:
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
            "source", "l2-category", "comment", "split"]  # fmt: skip
    rows = [
        [0, "What is shown?", "nan", "cat", "dog", "", "", "B", "scene", b64_image("JPEG"), "x", "cp", "nan", "dev"],
        [1, "Which color?", "Look closely.", "red", "green", "blue", "pink", "C", "color", b64_image("PNG"), "x", "fp", "nan", "dev"],
        [1000001, "Which color?", "Look closely.", "blue", "red", "green", "pink", "A", "color", "1", "x", "fp", "nan", "dev"],
    ]  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "mmbench_dev_20230712.tsv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(cols)
        writer.writerows(rows)


def fake_refcoco(
    root: Path, refs_name: str = "refs(unc).p", splits: tuple = ("val", "testA", "testB")
) -> None:
    images, anns, refs = [], [], []
    for k, split in enumerate(("train", *splits)):
        image_id = 581857 + k
        name = f"COCO_train2014_{image_id:012d}.jpg"
        jpg(root / "train2014" / name, (40, 30))
        images.append({"id": image_id, "file_name": name, "width": 40, "height": 30})
        anns.append({"id": 1000 + k, "image_id": image_id, "category_id": 1, "bbox": [2.0 + k, 3.0, 10.0, 8.0],
                     "area": 80.0, "iscrowd": 0, "segmentation": [[2, 3, 12, 3, 12, 11]]})  # fmt: skip
        refs.append({"ref_id": k, "ann_id": 1000 + k, "image_id": image_id, "split": split,
                     "category_id": 1, "file_name": name.replace(".jpg", f"_{1000 + k}.jpg"), "sent_ids": [10 * k, 10 * k + 1],
                     "sentences": [{"sent_id": 10 * k, "sent": "left guy", "tokens": ["left", "guy"], "raw": "Left guy"},
                                   {"sent_id": 10 * k + 1, "sent": "man on left", "tokens": [], "raw": "man on left"}]})  # fmt: skip
    dump(root / "instances.json", {"info": {}, "licenses": [], "images": images, "annotations": anns,
                                   "categories": [{"id": 1, "name": "person", "supercategory": "person"}]})  # fmt: skip
    with open(root / refs_name, "wb") as handle:
        pickle.dump(refs, handle)


def fake_refcocog(root: Path) -> None:
    fake_refcoco(root, "refs(umd).p", ("val", "test"))


def fake_reasonseg_val(root: Path) -> None:
    for stem, is_sentence in (("a1b2", True), ("c3d4", False)):
        jpg(root / "val" / f"{stem}.jpg", (20, 16))
        dump(root / "val" / f"{stem}.json", {
            "text": ["the thing that keeps you dry" if is_sentence else "umbrella", "other"],
            "is_sentence": is_sentence,
            "shapes": [{"label": "target", "points": [[2, 2], [12, 2], [12, 10], [2, 10]], "group_id": None,
                        "shape_type": "polygon", "flags": {}},
                       {"label": "ignore", "points": [[4, 4], [6, 4], [6, 6]], "shape_type": "polygon"},
                       {"label": "flag", "points": [[0, 0], [19, 0], [19, 15]], "shape_type": "polygon"}],
        })  # fmt: skip


def fake_flickr30k_test(root: Path) -> None:
    images = []
    for i, (name, split) in enumerate(
        (("1000092795.jpg", "test"), ("10002456.jpg", "train"), ("1007129816.jpg", "test"))
    ):
        jpg(root / "flickr30k-images" / name)
        sents = [{"tokens": ["a", "dog", str(j)], "raw": f"A dog runs in field {j} of {name[:4]}.",
                  "imgid": i, "sentid": 5 * i + j} for j in range(5)]  # fmt: skip
        images.append({"sentids": [s["sentid"] for s in sents], "imgid": i, "sentences": sents,
                       "split": split, "filename": name})  # fmt: skip
    dump(root / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})


def fake_coco_captions(path: Path, image_dir: Path, n: int, prefix: str, domain: bool) -> None:
    images, anns = [], []
    for i in range(n):
        name = f"{prefix}{i:012d}.jpg"
        jpg(image_dir / name)
        images.append({"id": 100 + i, "file_name": name, "height": 10, "width": 12}
                      | ({"domain": ["in-domain", "out-domain"][i % 2], "open_images_id": name[:8]} if domain else {}))  # fmt: skip
        anns += [{"image_id": 100 + i, "id": 1000 * i + j, "caption": f"a {['cat', 'bus', 'tree', 'boat'][i % 4]} number {j} "}
                 for j in range(5)]  # fmt: skip
    dump(path, {"info": {}, "licenses": [], "images": images, "annotations": anns})


def fake_nocaps_val(root: Path) -> None:
    fake_coco_captions(
        root / "nocaps_val_4500_captions.json", root / "validation", 2, "0013ea20", True
    )


def fake_coco30k_t2i(root: Path) -> None:
    fake_coco_captions(root / "captions_val2014.json", root / "val2014", 4, "COCO_val2014_", False)


def fake_magicbrush_test(root: Path) -> None:
    sessions = {}
    for img_id in ("327726", "242679"):
        folder = root / "images" / img_id
        jpg(folder / f"{img_id}-input.png", fmt="PNG")
        turns = []
        for t in (1, 2):
            jpg(folder / f"{img_id}-output{t}.png", fmt="PNG")
            jpg(folder / f"{img_id}-mask{t}.png", fmt="PNG")
            src = f"{img_id}-input.png" if t == 1 else f"{img_id}-output{t - 1}.png"
            turns.append({"input": src, "mask": f"{img_id}-mask{t}.png", "output": f"{img_id}-output{t}.png",
                          "instruction": f"make it {['red', 'blue'][t - 1]}"})  # fmt: skip
        sessions[img_id] = turns
    dump(root / "edit_sessions.json", sessions)


# ------------------------------------------------ predictions: right and wrong for each metric


def _text(key: str, wrong: Callable[[Any], str] = lambda _: "zebra") -> Callable[[dict, bool], Any]:
    return lambda d, ok: (
        (d[key][0] if isinstance(d[key], list) else d[key]) if ok else wrong(d[key])
    )


def _box(d: dict, ok: bool) -> list[float]:
    box = xywh_to_xyxy(np.asarray(d["box"]))[0].tolist()
    return box if ok else [b + 20 for b in box]


def _mask(d: dict, ok: bool) -> dict:
    mask = load_label_map(d["mask"]) > 0
    return encode_labels(mask if ok else ~mask)


def _image(d: dict, ok: bool) -> str:
    return d["target"] if ok else d.get("image") or str(Path(d["target"]).with_suffix(".wrong.png"))


FLIP = {"yes": "no", "no": "yes"}
# benchmark: (fake writer, {task: number of documents}, prediction rule)
CASES: dict[str, tuple[Callable[[Path], None], dict[str, int], Callable[[dict, bool], Any]]] = {
    "vqav2_val": (fake_vqav2_val, {"vqav2_val": 3}, _text("answers")),
    "okvqa_val": (fake_okvqa_val, {"okvqa_val": 3}, _text("answers")),
    "gqa_testdev": (fake_gqa_testdev, {"gqa_testdev": 2}, _text("answer")),
    "vizwiz_val": (fake_vizwiz_val, {"vizwiz_val": 2}, _text("answers")),
    "textvqa_val": (fake_textvqa_val, {"textvqa_val": 2}, _text("answers")),
    "pope": (fake_pope, {"pope": 6, "pope_coco_random": 2, "pope_coco_popular": 2,
                         "pope_coco_adversarial": 2}, _text("label", FLIP.get)),  # fmt: skip
    "mme": (fake_mme, {"mme": 40, "mme_cognition": 16}, _text("answer", FLIP.get)),
    "mmbench_dev": (fake_mmbench_dev, {"mmbench_dev": 3}, _text("answer", lambda a: "D" if a != "D" else "A")),
    "refcoco": (fake_refcoco, {"refcoco_val": 2, "refcoco_testA": 2, "refcoco_testB": 2}, _box),
    "refcoco_plus": (fake_refcoco, {"refcoco_plus_val": 2, "refcoco_plus_testA": 2, "refcoco_plus_testB": 2}, _box),
    "refcocog": (fake_refcocog, {"refcocog_val": 2, "refcocog_test": 2}, _box),
    "reasonseg_val": (fake_reasonseg_val, {"reasonseg_val": 2}, _mask),
    "flickr30k_test": (fake_flickr30k_test, {"flickr30k_test": 2}, _text("references")),
    "nocaps_val": (fake_nocaps_val, {"nocaps_val": 2}, _text("references")),
    "coco30k_t2i": (fake_coco30k_t2i, {"coco30k_t2i": 3}, _image),
    "magicbrush_test": (fake_magicbrush_test, {"magicbrush_test": 4}, _image),
}  # fmt: skip


def extractors() -> dict[str, ProjectionExtractor]:
    return {
        "clip": ProjectionExtractor.random(seed=1),
        "inception": ProjectionExtractor.random(dim=2, seed=2),
    }


def test_every_cli_benchmark_has_a_case_and_a_readme_row() -> None:
    assert set(CASES) | {"vqav2_testdev"} == set(BENCHMARKS)
    readme = (REPO / "packages" / "setok-eval" / "README.md").read_text()
    for name in BENCHMARKS:
        assert f"eval_export.py {name} " in readme, name


@pytest.mark.parametrize("benchmark", sorted(CASES))
def test_export_loads_through_the_registry_and_scores(benchmark: str, tmp_path: Path) -> None:
    fake, counts, predict = CASES[benchmark]
    root, out = tmp_path / "official", tmp_path / "data_root"
    fake(root)
    paths = export_benchmark(benchmark, root, out, num=3 if benchmark == "coco30k_t2i" else None)
    assert {t: p.name for t, p in paths.items()} == {t: f"{t}.jsonl" for t in counts}
    for task in load_tasks(TASKS_DIR, sorted(counts)):
        docs, version = load_documents(task, data_root=out)
        assert len(docs) == counts[task.name]
        assert version.startswith("sha256:")
        for key in ("image", "target", "mask"):
            assert all(Path(d[key]).is_file() for d in docs if key in d)
        for d in docs if benchmark == "coco30k_t2i" else []:  # a wrong generation: the negative
            real = np.asarray(Image.open(d["target"]).convert("RGB"))
            Image.fromarray(255 - real).save(Path(d["target"]).with_suffix(".wrong.png"))
        scores = {}
        for ok in (True, False):
            preds = {d["id"]: predict(d, ok) for d in docs}
            scored = score_task(task, docs, preds, tmp_path / "eval", extractors=extractors())
            scores[ok] = scored[task.primary].value
        better = (lambda a, b: a > b) if task.higher_is_better else (lambda a, b: a < b)
        assert better(scores[True], scores[False]), (task.name, scores)
        if task.primary in ("vqa_accuracy", "exact_match", "pope_f1", "rec_accuracy", "giou", "l1"):
            assert scores[True] == pytest.approx(0.0 if task.primary == "l1" else 1.0), (
                task.name,
                scores,
            )


def test_document_fields_follow_the_official_ids_and_answers(tmp_path: Path) -> None:
    for name in (
        "vqav2_val",
        "okvqa_val",
        "pope",
        "mmbench_dev",
        "refcocog",
        "reasonseg_val",
        "mme",
        "vqav2_testdev",
    ):
        fake = fake_vqav2_testdev if name == "vqav2_testdev" else CASES[name][0]
        fake(tmp_path / name)
        export_benchmark(name, tmp_path / name, tmp_path / "out")

    def docs(task: str) -> dict[str, dict]:
        lines = (tmp_path / "out" / "data" / "eval" / f"{task}.jsonl").read_text().splitlines()
        return {d["id"]: d for d in map(json.loads, lines)}

    vqa = docs("vqav2_val")
    assert sorted(vqa) == ["42000", "42001", "7000"] and vqa["42000"]["answers"][:2] == ["2", "2"]
    assert vqa["7000"]["image"].endswith("val2014/COCO_val2014_000000000007.jpg")
    assert docs("okvqa_val")["42001"]["answers"][0] == "red"  # `answer`, not `raw_answer`
    testdev = docs("vqav2_testdev")
    assert "answers" not in testdev["42000"] and testdev["42000"]["question_id"] == 42000
    pope = docs("pope")
    assert sorted(pope) == sorted(
        f"{s}-{q}" for s in ("adversarial", "popular", "random") for q in (1, 2)
    )
    mmb = docs("mmbench_dev")
    assert (
        mmb["0"]["question"] == "What is shown?\nA. cat\nB. dog"
    )  # 'nan' hint, empty options dropped
    assert mmb["1"]["question"].startswith("Look closely.\nWhich color?\nA. red")
    assert mmb["1000001"]["image"] == mmb["1"]["image"] and mmb["1000001"]["circular_group"] == 1
    assert sorted(docs("refcocog_test")) == ["2-20", "2-21"]
    seg = docs("reasonseg_val")
    assert seg["c3d4"]["expression"] == "What is umbrella in this image?"
    assert seg["a1b2"]["expression"] == "the thing that keeps you dry"
    mask = load_label_map(tmp_path / "out" / "data" / "eval" / seg["a1b2"]["mask"]) > 0
    assert mask[2:11, 2:13].sum() == mask.sum() < 9 * 11  # 'flag' skipped, 'ignore' cut out
    assert mask[2, 2] and mask[10, 12] and not mask[5, 5]
    mme = docs("mme")
    assert mme["existence/0000/0"]["answer"] == "yes" and mme["existence/0000/1"]["answer"] == "no"
    assert {d["subtask"] for d in docs("mme_cognition").values()} == {"commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"}  # fmt: skip


def test_same_official_files_give_the_same_data_version_wherever_images_live(
    tmp_path: Path,
) -> None:
    fake_pope(tmp_path / "a")
    moved = tmp_path / "elsewhere" / "coco"
    moved.parent.mkdir()
    (tmp_path / "a" / "val2014").rename(moved)
    export_benchmark("pope", tmp_path / "a", tmp_path / "o1", images=moved)
    fake_pope(tmp_path / "b")
    export_benchmark("pope", tmp_path / "b", tmp_path / "o2")
    v1 = json.loads((tmp_path / "o1/data/eval/pope.jsonl").read_text().splitlines()[0])[
        "data_version"
    ]
    v2 = json.loads((tmp_path / "o2/data/eval/pope.jsonl").read_text().splitlines()[0])[
        "data_version"
    ]
    assert v1 == v2


def _edit_json(path: Path, edit: Callable[[Any], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


BAD = [  # (benchmark, corrupt the fake files, words the error must contain)
    ("vqav2_val", lambda r: _edit_json(r / "v2_mscoco_val2014_annotations.json",
                                       lambda d: d["annotations"][1].pop("answers")),
     ["v2_mscoco_val2014_annotations.json", "42001", "'answers'", "missing"]),
    ("vqav2_val", lambda r: _edit_json(r / "v2_mscoco_val2014_annotations.json",
                                       lambda d: d["annotations"][0]["answers"][3].update(answer=5)),
     ["42000", "answers[3].answer"]),
    ("vqav2_val", lambda r: (r / "val2014" / "COCO_val2014_000000000007.jpg").unlink(),
     ["v2_OpenEnded_mscoco_val2014_questions.json", "7000", "'image'", "not found"]),
    ("gqa_testdev", lambda r: _edit_json(r / "testdev_balanced_questions.json",
                                         lambda d: d["20968379"].update(imageId=17)),
     ["testdev_balanced_questions.json", "20968379", "'imageId'", "expected str"]),
    ("pope", lambda r: (r / "coco_pope_popular.json").write_text(
        (r / "coco_pope_popular.json").read_text().replace('"label": "no"', '"label": "maybe"')),
     ["coco_pope_popular.json", "record 2", "'label'"]),
    ("textvqa_val", lambda r: _edit_json(r / "TextVQA_0.5.1_val.json",
                                         lambda d: d["data"][1].update(question_id=34602)),
     ["TextVQA_0.5.1_val.json", "34602", "'id'", "twice"]),
    ("mme", lambda r: (r / "count" / "0010.txt").write_text("How many?\tthree\n"),
     ["0010.txt", "line 1", "'answer'"]),
    ("mmbench_dev", lambda r: (r / "mmbench_dev_20230712.tsv").write_text(
        (r / "mmbench_dev_20230712.tsv").read_text().replace("\tB\tscene", "\tE\tscene")),
     ["mmbench_dev_20230712.tsv", "'0'", "'answer'", "'E'"]),
    ("refcoco", lambda r: _edit_json(r / "instances.json",
                                     lambda d: d["annotations"][2].update(bbox=[1, 1, 0, 5])),
     ["instances.json", "1002", "'bbox'"]),
    ("reasonseg_val", lambda r: _edit_json(r / "val" / "c3d4.json", lambda d: d.update(is_sentence="no")),
     ["c3d4.json", "'c3d4'", "'is_sentence'", "expected bool"]),
    ("magicbrush_test", lambda r: _edit_json(r / "edit_sessions.json", lambda d: d["242679"][1].pop("output")),
     ["edit_sessions.json", "242679-2", "'output'", "missing"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "benchmark,corrupt,words", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_records_name_file_record_and_field(
    benchmark: str, corrupt: Callable, words: list[str], tmp_path: Path
) -> None:
    fake = fake_refcoco if benchmark == "refcoco" else CASES[benchmark][0]
    fake(tmp_path / "root")
    corrupt(tmp_path / "root")
    with pytest.raises(ExportError) as info:
        export_benchmark(benchmark, tmp_path / "root", tmp_path / "out")
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert not list((tmp_path / "out").rglob("*.jsonl"))  # nothing half-written


def test_cli_writes_and_reports_and_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    fake_gqa_testdev(tmp_path / "gqa")
    assert (
        main(["gqa_testdev", "--root", str(tmp_path / "gqa"), "--out", str(tmp_path / "out")]) == 0
    )
    assert "gqa_testdev: 2 documents" in capsys.readouterr().out
    assert (
        main(["coco30k_t2i", "--root", str(tmp_path / "gqa"), "--out", str(tmp_path / "out")]) == 2
    )
    assert "captions_val2014.json" in capsys.readouterr().err
    fake_coco30k_t2i(tmp_path / "coco")
    assert (
        main(
            [
                "coco30k_t2i",
                "--root",
                str(tmp_path / "coco"),
                "--out",
                str(tmp_path / "o"),
                "--num",
                "9",
            ]
        )
        == 2
    )
    assert "--num 9 but only 4 images" in capsys.readouterr().err


def test_exported_tasks_run_through_the_suite_cli(tmp_path: Path) -> None:
    """The user's path: export CLI -> predictions -> eval_suite/run.py with --data-root."""
    spec = importlib.util.spec_from_file_location("eval_suite_run", REPO / "eval_suite" / "run.py")
    assert spec is not None and spec.loader is not None
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    fake_pope(tmp_path / "pope")
    fake_refcoco(tmp_path / "refcoco")
    data_root = tmp_path / "data_root"
    for name in ("pope", "refcoco"):
        assert main([name, "--root", str(tmp_path / name), "--out", str(data_root)]) == 0
    tasks = load_tasks(TASKS_DIR, ["pope_coco_adversarial", "refcoco_testB"])
    lines = []
    for task, predict in zip(tasks, (_text("label", FLIP.get), _box), strict=True):
        docs, _ = load_documents(task, data_root=data_root)
        for k, d in enumerate(docs):  # the first document right, the second wrong
            pred = predict(d, k == 0)
            lines.append(json.dumps({"task": task.name, "id": d["id"], "prediction": pred}))
    (tmp_path / "preds.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["--adapter", f"replay:{tmp_path / 'preds.jsonl'}", "--data-root", str(data_root),
            "--out", str(tmp_path / "eval"), "--resamples", "0", "--no-progress",
            "--tasks", "pope_coco_adversarial", "refcoco_testB"]  # fmt: skip
    assert cli.main(argv) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["tasks"]
    assert results["refcoco_testB"]["metrics"]["rec_accuracy"]["value"] == 0.5
    assert results["pope_coco_adversarial"]["metrics"]["pope_accuracy"]["value"] == 0.5
    assert results["refcoco_testB"]["data_version"].startswith("sha256:")
