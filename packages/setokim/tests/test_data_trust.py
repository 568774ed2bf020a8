"""Datasets are never overwritten or mixed, bad records are named, keys stay unique."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from setokim.data.check import check_shards
from setokim.data.converters import convert_coco, convert_vqav2
from setokim.data.converters.common import RecordError
from setokim.data.converters.fake_vqav2 import write_fake_vqav2
from setokim.data.generate import generate_dataset
from setokim.data.schema import SampleAnnotation
from setokim.data.shards import ShardWriter, read_manifest, write_manifest


def _vqa(tmp_path: Path, split: str = "val", n: int = 3, first: int = 1):
    return write_fake_vqav2(tmp_path / "raw", split, n, first_image_id=first)


def _convert(fake, out: Path, split: str, **kw):
    return convert_vqav2(
        fake.images, out, split, questions_json=fake.questions,
        annotations_json=fake.annotations, coco_split=fake.coco_split, **kw,
    )  # fmt: skip


def test_integer_answer_names_file_record_and_field_and_leaves_nothing(tmp_path):
    fake = _vqa(tmp_path)
    anns = json.loads(fake.annotations.read_text())
    anns["annotations"][4]["multiple_choice_answer"] = 3  # an int, not the official str
    fake.annotations.write_text(json.dumps(anns))
    out = tmp_path / "out"
    with pytest.raises(RecordError) as err:
        _convert(fake, out, "train")
    qid = anns["annotations"][4]["question_id"]
    msg = str(err.value)
    assert fake.annotations.name in msg and f"question_id {qid}" in msg
    assert "multiple_choice_answer" in msg
    assert not out.exists()  # a failed conversion leaves no folder behind
    manifest = _convert(fake, out, "train", skip_bad=True)  # counted and reported instead
    assert manifest["info"]["skipped_records"] == {"train": 1}
    assert manifest["splits"]["train"]["num_samples"] == 3  # the image keeps its other questions
    assert check_shards(out) == []


def test_existing_split_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    _convert(_vqa(tmp_path, n=2), out, "train")
    before = read_manifest(out)
    with pytest.raises(FileExistsError, match="already holds split 'train'.*--overwrite"):
        _convert(_vqa(tmp_path, n=3, first=50), out, "train")
    assert read_manifest(out) == before
    after = _convert(_vqa(tmp_path, n=3, first=50), out, "train", overwrite=True)
    assert after["splits"]["train"]["num_samples"] == 3 and check_shards(out) == []
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        generate_dataset(out, 2, 0, 0, 32)
    assert read_manifest(out) == after


def test_keys_unique_across_splits_and_card_has_blind_baselines(tmp_path):
    out = tmp_path / "out"
    # both splits restart their ids at 1: the same source keys in train and test
    _convert(_vqa(tmp_path, "train", n=4), out, "train")
    _convert(_vqa(tmp_path, "test", n=2), out, "test")
    keys = {
        split: {e["first_key"] for e in body["shards"]}
        for split, body in read_manifest(out)["splits"].items()
    }
    assert keys == {"train": {"train-vqav2-000000000001"}, "test": {"test-vqav2-000000000001"}}
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["blind_baseline_fit"] == "train"
    assert set(card["blind_baseline"]["test"]) == {"other", "yes/no", "number"}
    assert card["blind_baseline"]["test"]["number"]["by_type"] == 1.0  # always "1"
    assert card["splits"]["train"]["items"]["vqa"] == 12


def test_a_folder_holds_one_source(tmp_path):
    out = tmp_path / "out"
    _convert(_vqa(tmp_path, n=2), out, "train")
    images = [{"id": 1, "file_name": "a.jpg", "width": 48, "height": 48}]
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "a.jpg").write_bytes(
        next(_vqa(tmp_path).images.glob("*.jpg")).read_bytes()
    )
    caps = tmp_path / "caps.json"
    caps.write_text(
        json.dumps({"images": images, "annotations": [{"id": 1, "image_id": 1, "caption": "x"}]})
    )
    with pytest.raises(FileExistsError, match="holds .*vqav2.* data"):
        convert_coco(tmp_path / "coco", out, "val", captions_json=caps)


def _coco_files(tmp_path: Path, ann: dict) -> tuple[Path, Path]:
    img_dir = tmp_path / "coco"
    img_dir.mkdir(exist_ok=True)
    (img_dir / "a.jpg").write_bytes(next(_vqa(tmp_path).images.glob("*.jpg")).read_bytes())
    inst = tmp_path / "instances.json"
    inst.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 48, "height": 48}],
        "annotations": [ann], "categories": [{"id": 1, "name": "square"}],
    }))  # fmt: skip
    return img_dir, inst


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"segmentation": None}, "annotation id 7: missing field 'segmentation'"),
        ({"category_id": 99}, "annotation id 7: field 'category_id': 99 is not in the file's categories"),
    ],
)  # fmt: skip
def test_coco_annotation_errors_are_named(tmp_path, change, match):
    ann = {"id": 7, "image_id": 1, "category_id": 1, "bbox": [0, 0, 8, 8], "area": 64,
           "iscrowd": 0, "segmentation": [[0, 0, 8, 0, 8, 8, 0, 8]]}  # fmt: skip
    ann.update(change)
    if ann["segmentation"] is None:
        del ann["segmentation"]
    img_dir, inst = _coco_files(tmp_path, ann)
    with pytest.raises(RecordError, match=match):
        convert_coco(img_dir, tmp_path / "out", "val", instances_json=inst)
    assert not (tmp_path / "out").exists()


def test_check_shards_names_wrong_types_and_bad_folders(tmp_path):
    out = tmp_path / "hand"
    out.mkdir()
    ann = SampleAnnotation(key="k1", width=8, height=8).to_dict()
    ann["vqa"] = [{"question": "q?", "answer": 3, "answers": ["3"] * 10, "qtype": "number"}]
    fake = _vqa(tmp_path)
    with ShardWriter(out, "train") as w:
        w.write(
            "k1",
            {"jpg": next(fake.images.glob("*.jpg")).read_bytes(), "json": json.dumps(ann).encode()},
        )
    write_manifest(out, {"train": w.shards}, {"source": "hand"})
    (problem,) = check_shards(out)
    assert problem.key == "k1" and "vqa[0].answer: expected str, got int" in problem.reason
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_shards(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is empty: not a shard folder"):
        check_shards(tmp_path / "empty")
