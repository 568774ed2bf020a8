"""Each converter on a tiny fixture written in that dataset's real on-disk layout."""

from __future__ import annotations

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from setokim.data.check import check_shards
from setokim.data.converters import (
    convert_coco,
    convert_edit_pairs,
    convert_gqa,
    convert_img2dataset,
    convert_llava,
    convert_refcoco,
    convert_vqav2,
)
from setokim.data.loader import make_loader


def jpg(path, w=40, h=30, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="JPEG")
    return path


def batches(out, split, task, bsz=8, **kw):
    kw.setdefault("image_size", 32)
    return list(make_loader(out, split, task, bsz, shuffle=False, **kw))


def coco_instances(images):
    return {
        "images": images,
        "annotations": [
            # polygon: a 10x10 square at (5, 5)
            {"id": 1, "image_id": 1, "category_id": 18, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0,
             "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 10, 8, 12], "area": 96, "iscrowd": 0,
             "segmentation": [[20, 10, 28, 10, 28, 22, 20, 22]]},
            # crowd annotation: uncompressed RLE with list counts (30 x 40 image, column-major)
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 30], "area": 30, "iscrowd": 1,
             "segmentation": {"size": [30, 40], "counts": [0, 30, 1170]}},
        ],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 18, "name": "dog", "supercategory": "animal"}],
    }  # fmt: skip


def test_coco_captions_and_instances(tmp_path):
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 40, "height": 30} for i in (1, 2)]
    for im in images:
        jpg(tmp_path / "val2017" / im["file_name"], seed=im["id"])
    caps = {"images": images, "annotations": [
        {"id": 10, "image_id": 1, "caption": "A dog and a person."},
        {"id": 11, "image_id": 1, "caption": "Two friends. "},
        {"id": 12, "image_id": 2, "caption": "A person standing."},
    ]}  # fmt: skip
    (tmp_path / "captions_val2017.json").write_text(json.dumps(caps))
    (tmp_path / "instances_val2017.json").write_text(json.dumps(coco_instances(images)))
    out = tmp_path / "out"
    m = convert_coco(tmp_path / "val2017", out, "val", captions_json=tmp_path / "captions_val2017.json",
                     instances_json=tmp_path / "instances_val2017.json")  # fmt: skip
    assert m["splits"]["val"]["num_samples"] == 2 and check_shards(out) == []
    (b,) = batches(out, "val", "caption", expand=True, bsz=3)
    assert sorted(b["captions"]) == ["A dog and a person.", "A person standing.", "Two friends."]
    (r,) = batches(out, "val", "rec", expand=True, bsz=3, image_size=None)
    assert r["expressions"] == ["the dog", "the person", "the person"]
    # polygon mask: pycocotools rasterises the 10x10 square; crowd RLE = first column
    assert r["target_masks"][0, 5:15, 5:15].all() and r["target_masks"][0].sum() <= 121
    assert r["target_boxes"][0].tolist() == [5.0, 5.0, 15.0, 15.0]
    assert r["target_masks"][2, :, 0].all() and r["target_masks"][2].sum() == 30


def test_vqav2_and_gqa(tmp_path):
    for i in (7, 9):
        jpg(tmp_path / "val2014" / f"COCO_val2014_{i:012d}.jpg", seed=i)
    qs = {"questions": [
        {"image_id": 7, "question": "What is it?", "question_id": 70},
        {"image_id": 7, "question": "Is it red?", "question_id": 71},
        {"image_id": 9, "question": "How many?", "question_id": 90},
    ]}  # fmt: skip
    anns = {"annotations": [
        {"question_id": q["question_id"], "image_id": q["image_id"], "question_type": "what",
         "answer_type": t, "multiple_choice_answer": a,
         "answers": [{"answer": a if k < 7 else "other", "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]}
        for q, t, a in zip(qs["questions"], ["other", "yes/no", "number"], ["cat", "no", "2"], strict=True)
    ]}  # fmt: skip
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(anns))
    out = tmp_path / "vqa"
    convert_vqav2(
        tmp_path / "val2014",
        out,
        "val",
        questions_json=tmp_path / "q.json",
        annotations_json=tmp_path / "a.json",
    )
    (b,) = batches(out, "val", "vqa", expand=True, bsz=3)
    assert b["questions"] == ["What is it?", "Is it red?", "How many?"]
    assert b["answers"] == ["cat", "no", "2"] and b["question_types"] == [
        "other",
        "yes/no",
        "number",
    ]
    assert b["answer_lists"][0].count("cat") == 7 and len(b["answer_lists"][2]) == 10
    # GQA balanced questions
    jpg(tmp_path / "gqa" / "n123.jpg")
    gqa = {"05": {"imageId": "n123", "question": "Is the sky blue?", "answer": "yes", "fullAnswer": "Yes, it is.",
                  "types": {"structural": "verify", "semantic": "attr", "detailed": "colorVerify"}}}  # fmt: skip
    (tmp_path / "val_balanced_questions.json").write_text(json.dumps(gqa))
    out2 = tmp_path / "gqa_out"
    convert_gqa(
        tmp_path / "gqa", out2, "val", questions_json=tmp_path / "val_balanced_questions.json"
    )
    (g,) = batches(out2, "val", "vqa")
    assert (
        g["key"] == ["val-gqa-n123"] and g["answers"] == ["yes"] and g["question_types"] == ["verify"]
    )


@pytest.mark.parametrize("variant", ["llava", "sharegpt4v", "allava"])
def test_llava_style_conversations(tmp_path, variant):
    jpg(tmp_path / "coco" / "train2017" / "000000000001.jpg")
    jpg(tmp_path / "coco" / "train2017" / "000000000002.jpg", seed=2)
    human, gpt = ("user", "assistant") if variant == "allava" else ("human", "gpt")
    items = [
        {"id": "a", "image": "coco/train2017/000000000001.jpg", "conversations": [
            {"from": human, "value": "<image>\nWhat is shown?"}, {"from": gpt, "value": "Noise."}]},
        {"id": "b", "image": "coco/train2017/000000000002.jpg", "conversations": [
            {"from": human, "value": "<image>\nDescribe."}, {"from": gpt, "value": "More noise."},
            {"from": human, "value": "Colour?"}, {"from": gpt, "value": "Many."}]},
        {"id": "text-only", "conversations": [{"from": human, "value": "Hi"}, {"from": gpt, "value": "Hello"}]},
    ]  # fmt: skip
    (tmp_path / "chat.json").write_text(json.dumps(items))
    out = tmp_path / "out"
    m = convert_llava(tmp_path / "chat.json", tmp_path, out, "train", source=variant)
    assert m["splits"]["train"]["num_samples"] == 2 and m["info"]["source"] == variant
    (b,) = batches(out, "train", "chat")
    assert [len(c) for c in b["conversations"]] == [2, 4]
    assert b["conversations"][1][2] == {"from": "human", "value": "Colour?"}
    assert b["key"][0] == f"train-{variant}-coco_train2017_000000000001"


def test_refcoco(tmp_path):
    images = [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 40, "height": 30},
              {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 40, "height": 30}]  # fmt: skip
    for im in images:
        jpg(tmp_path / "train2014" / im["file_name"], seed=im["id"])
    (tmp_path / "instances.json").write_text(json.dumps(coco_instances(images)))
    refs = [
        {"ref_id": 0, "ann_id": 2, "image_id": 1, "split": "testA", "category_id": 1,
         "file_name": "COCO_train2014_000000000001_2.jpg",
         "sentences": [{"sent": "man on the right", "raw": "Man on the right", "tokens": [], "sent_id": 0},
                       {"sent": "right guy", "raw": "right guy", "tokens": [], "sent_id": 1}]},
        {"ref_id": 1, "ann_id": 1, "image_id": 1, "split": "testA", "category_id": 18,
         "file_name": "x.jpg", "sentences": [{"sent": "dog", "raw": "dog", "tokens": [], "sent_id": 2}]},
        {"ref_id": 2, "ann_id": 3, "image_id": 2, "split": "train", "category_id": 1,
         "file_name": "y.jpg", "sentences": [{"sent": "left person", "raw": "", "tokens": [], "sent_id": 3}]},
    ]  # fmt: skip
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs))
    out = tmp_path / "out"
    m = convert_refcoco(tmp_path / "train2014", out, "testA", refs_pickle=tmp_path / "refs(unc).p",
                        instances_json=tmp_path / "instances.json")  # fmt: skip
    assert m["splits"]["testA"]["num_samples"] == 1
    (b,) = batches(out, "testA", "rec", expand=True, bsz=3, image_size=None)
    assert b["expressions"] == ["man on the right", "right guy", "dog"]
    assert b["target_index"].tolist() == [1, 1, 0]
    assert b["target_boxes"][0].tolist() == [20.0, 10.0, 28.0, 22.0]
    with pytest.raises(ValueError, match="ref_split"):
        convert_refcoco(
            tmp_path / "train2014",
            out,
            "val",
            refs_pickle=tmp_path / "refs(unc).p",
            instances_json=tmp_path / "instances.json",
        )


def test_instructpix2pix_and_magicbrush(tmp_path):
    root = tmp_path / "ip2p"
    folder = root / "shard-00" / "0000001"
    folder.mkdir(parents=True)
    (folder / "prompt.json").write_text(
        json.dumps({"input": "a house", "edit": "make it snowy", "output": "a snowy house"})
    )
    for seed in ("111", "222"):
        jpg(folder / f"{seed}_0.jpg", seed=1)
        jpg(folder / f"{seed}_1.jpg", seed=2)
    out = tmp_path / "out"
    convert_edit_pairs(root, out, "train", layout="instructpix2pix")
    (b,) = batches(out, "train", "edit")
    assert b["instructions"] == ["make it snowy"] * 2 and b["target_pixels"].shape == (2, 3, 32, 32)
    assert not torch.equal(b["pixels"], b["target_pixels"])
    mb = tmp_path / "mb"
    jpg(mb / "images" / "327726" / "327726-input.png".replace(".png", ".jpg"), seed=3)
    jpg(mb / "images" / "327726" / "327726-output1.jpg", seed=4)
    jpg(mb / "images" / "327726" / "327726-output2.jpg", seed=5)
    sessions = {"327726": [
        {"input": "327726-input.jpg", "output": "327726-output1.jpg", "instruction": "add a hat"},
        {"input": "327726-output1.jpg", "output": "327726-output2.jpg", "instruction": "make the hat red"},
    ]}  # fmt: skip
    (mb / "edit_sessions.json").write_text(json.dumps(sessions))
    with pytest.raises(FileExistsError, match="holds .*instructpix2pix.* data"):
        convert_edit_pairs(mb, out, "dev", layout="magicbrush")  # one source per folder
    out = tmp_path / "mb_out"
    convert_edit_pairs(mb, out, "dev", layout="magicbrush")
    (d,) = batches(out, "dev", "edit")
    assert d["instructions"] == ["add a hat", "make the hat red"]
    assert torch.equal(d["pixels"][1], b_first_target(out))
    assert set(json.loads((out / "manifest.json").read_text())["splits"]) == {"dev"}


def b_first_target(out):
    # turn 1's input is turn 0's output: same image bytes -> same pixels
    (d,) = batches(out, "dev", "edit")
    return d["target_pixels"][0]


def test_img2dataset_pass_through(tmp_path):
    tar_path = tmp_path / "00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for k in range(3):
            key = f"0000000{k}"
            buf = io.BytesIO()
            Image.fromarray(np.full((24, 32, 3), 40 * k, np.uint8)).save(buf, format="JPEG")
            meta = {
                "url": f"http://example.com/{k}.jpg",
                "key": key,
                "status": "success",
                "width": 32,
                "height": 24,
            }
            for ext, data in (
                ("jpg", buf.getvalue()),
                ("txt", f"caption {k}".encode()),
                ("json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    convert_img2dataset([tar_path], out, "train", source="cc3m")
    assert check_shards(out) == []
    (b,) = batches(out, "train", "t2i")
    assert b["captions"] == ["caption 0", "caption 1", "caption 2"]
    assert b["key"][0] == "train-cc3m-00000-00000000"
    with tarfile.open(out / "train-000000.tar") as tar:
        stored = tar.extractfile("train-cc3m-00000-00000001.jpg").read()
    with tarfile.open(tar_path) as tar:
        assert stored == tar.extractfile("00000001.jpg").read()  # bytes passed through
