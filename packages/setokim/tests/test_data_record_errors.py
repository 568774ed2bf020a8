"""Converters check each record against the official schema field by field: a wrong-typed or
missing field fails naming the file, the record id and the field, and leaves nothing behind;
with skip_bad the record is counted and reported instead. RefCOCO (refs and instances), the
edit-pair layouts, img2dataset shards and SA-1B, on small hand-written records."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from setokim.data.converters import convert_edit_pairs, convert_img2dataset, convert_refcoco
from setokim.data.converters.common import RecordError
from setokim.data.converters.sa1b import convert_sa1b


def _jpeg(w: int = 24, h: int = 16, value: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _fails(convert: Callable[..., Any], out: Path, *names: str) -> RecordError:
    """The conversion fails with a RecordError whose message has every name; no output."""
    with pytest.raises(RecordError) as err:
        convert(out)
    msg = str(err.value)
    for name in names:
        assert name in msg, f"{name!r} not in {msg!r}"
    assert not out.exists()
    return err.value


def _skips(convert: Callable[..., Any], out: Path, samples: int, skipped: int) -> None:
    manifest = convert(out, skip_bad=True)
    assert manifest["info"]["skipped_records"] == {"train": skipped}
    assert manifest["splits"]["train"]["num_samples"] == samples


# ---- RefCOCO: refs(unc).p + instances.json ----------------------------------------------------
def _refcoco(tmp_path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    (tmp_path / "img").mkdir()
    images = []
    for i in (1, 2):
        name = f"COCO_train2014_{i:012d}.jpg"
        (tmp_path / "img" / name).write_bytes(_jpeg(value=40 * i))
        images.append({"id": i, "file_name": name, "width": 24, "height": 16})
    square = [[2, 2, 10, 2, 10, 10, 2, 10]]
    inst = {
        "images": images,
        "annotations": [{"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [2, 2, 8, 8],
                         "area": 64, "iscrowd": 0, "segmentation": square} for i in (1, 2)],
        "categories": [{"id": 1, "name": "box"}],
    }  # fmt: skip
    refs = [{"ref_id": 100 + i, "ann_id": 10 + i, "image_id": i, "split": "train",
             "category_id": 1, "file_name": f"x_{i}.jpg",
             "sentences": [{"sent": "the box", "raw": "The box", "tokens": ["the", "box"],
                            "sent_id": i}]} for i in (1, 2)]  # fmt: skip
    return refs, inst


def _write_refcoco(tmp_path: Path, refs: Any, inst: dict[str, Any]) -> Callable[..., Any]:
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs))
    (tmp_path / "instances.json").write_text(json.dumps(inst))

    def convert(out: Path, **kw: Any) -> Any:
        return convert_refcoco(tmp_path / "img", out, "train", refs_pickle=tmp_path / "refs(unc).p",
                               instances_json=tmp_path / "instances.json", **kw)  # fmt: skip

    return convert


@pytest.mark.parametrize(
    ("edit", "file", "record", "field", "skipped"),
    [
        (lambda r, i: r[1].update(image_id="2"), "refs(unc).p", "ref_id 102", "'image_id'", 1),
        (lambda r, i: r[0].pop("split"), "refs(unc).p", "ref_id 101", "'split'", 1),
        (lambda r, i: r[1]["sentences"][0].update(sent=7), "refs(unc).p", "ref_id 102",
         "'sentences[0].sent'", 1),
        (lambda r, i: r[1].update(ann_id=11), "refs(unc).p", "ref_id 102", "'ann_id'", 1),
        (lambda r, i: r[1].update(category_id=3), "refs(unc).p", "ref_id 102", "'category_id'", 1),
        (lambda r, i: i["annotations"][1].pop("segmentation"), "instances.json", "image_id 2",
         "'segmentation'", 1),
        # skipping an instance record also leaves the ref that points at it bad: both counted
        (lambda r, i: i["annotations"][0].update(image_id=None), "instances.json",
         "annotation id 11", "'image_id'", 2),
        (lambda r, i: i["images"][1].update(file_name=5), "instances.json", "images[id=2]",
         "'file_name'", 2),
    ],
)  # fmt: skip
def test_refcoco_bad_record_names_file_record_and_field(
    tmp_path: Path, edit: Callable[..., Any], file: str, record: str, field: str, skipped: int
) -> None:
    refs, inst = _refcoco(tmp_path)
    edit(refs, inst)
    convert = _write_refcoco(tmp_path, refs, inst)
    _fails(convert, tmp_path / "out", file, record, field)
    _skips(convert, tmp_path / "skip", samples=1, skipped=skipped)


def test_refcoco_refs_pickle_runs_no_code(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (tmp_path / "executed",))

    refs, inst = _refcoco(tmp_path)
    convert = _write_refcoco(tmp_path, [*refs, Payload()], inst)
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p.*not a refs pickle.*touch"):
        convert(tmp_path / "out")
    assert not (tmp_path / "executed").exists()


# ---- edit pairs: InstructPix2Pix and MagicBrush ------------------------------------------------
def _ip2p(tmp_path: Path, prompt: dict[str, Any]) -> Callable[..., Any]:
    root = tmp_path / "ip2p"
    good = {"input": "a house", "edit": "make it snowy", "output": "a snowy house"}
    for folder, text in (("0000001", prompt), ("0000002", good)):
        (root / folder).mkdir(parents=True)
        (root / folder / "prompt.json").write_text(json.dumps(text))
        (root / folder / "11_0.jpg").write_bytes(_jpeg(value=10))
        (root / folder / "11_1.jpg").write_bytes(_jpeg(value=200))

    def convert(out: Path, **kw: Any) -> Any:
        return convert_edit_pairs(root, out, "train", layout="instructpix2pix", **kw)

    return convert


@pytest.mark.parametrize(
    ("prompt", "field"),
    [({"input": "a", "edit": 3, "output": "c"}, "'edit'"), ({"input": "a", "edit": "x"}, "'output'")],
)  # fmt: skip
def test_instructpix2pix_bad_prompt_names_file_record_and_field(
    tmp_path: Path, prompt: dict[str, Any], field: str
) -> None:
    convert = _ip2p(tmp_path, prompt)
    _fails(convert, tmp_path / "out", "0000001/prompt.json", "record 'prompt'", field)
    _skips(convert, tmp_path / "skip", samples=1, skipped=1)


@pytest.mark.parametrize(
    ("turn", "record", "field"),
    [
        ({"input": "in.jpg", "output": "out.jpg", "instruction": ["x"]}, "327 turn 1",
         "'327[1].instruction'"),
        ({"input": "in.jpg", "instruction": "x"}, "327 turn 1", "'327[1].output'"),
        ({"input": "in.jpg", "output": "out.jpg", "instruction": "x", "mask": 1}, "327 turn 1",
         "'327[1].mask'"),
    ],
)  # fmt: skip
def test_magicbrush_bad_turn_names_file_record_and_field(
    tmp_path: Path, turn: dict[str, Any], record: str, field: str
) -> None:
    root = tmp_path / "mb"
    (root / "images" / "327").mkdir(parents=True)
    (root / "images" / "327" / "in.jpg").write_bytes(_jpeg(value=10))
    (root / "images" / "327" / "out.jpg").write_bytes(_jpeg(value=200))
    good = {"input": "in.jpg", "mask": "m.png", "output": "out.jpg", "instruction": "add a hat"}
    (root / "edit_sessions.json").write_text(json.dumps({"327": [good, turn]}))

    def convert(out: Path, **kw: Any) -> Any:
        return convert_edit_pairs(root, out, "train", layout="magicbrush", **kw)

    _fails(convert, tmp_path / "out", "edit_sessions.json", record, field)
    _skips(convert, tmp_path / "skip", samples=1, skipped=1)


# ---- img2dataset shards ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"status": 1}, "'status'"),
        ({"status": "failed_to_download"}, "'status'"),
        ({"width": "24"}, "'width'"),
        ({"height": 99}, "'height'"),
        ({"key": "00000009"}, "'key'"),
        ({"caption": 5}, "'caption'"),
        ({"url": None}, "'url'"),
        ({"json": b"{not json"}, "'json'"),
        ({"txt": b"\xff\xfe caption"}, "'txt'"),
    ],
)
def test_img2dataset_bad_sample_names_tar_key_and_field(
    tmp_path: Path, change: dict[str, Any], field: str
) -> None:
    tar_path = tmp_path / "00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for k in range(2):
            key = f"0000000{k}"
            meta = {"url": f"http://example.com/{k}.jpg", "key": key, "status": "success",
                    "caption": f"c {k}", "width": 24, "height": 16, "error_message": None}  # fmt: skip
            files = {"jpg": _jpeg(value=50 * k), "txt": f"c {k}".encode()}
            raw = {k2: v for k2, v in change.items() if k2 in ("json", "txt")}
            if k == 1:
                meta.update({k2: v for k2, v in change.items() if k2 not in raw})
                files.update(raw)
            files.setdefault("json", json.dumps(meta).encode())
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    def convert(out: Path, **kw: Any) -> Any:
        return convert_img2dataset([tar_path], out, "train", source="cc3m", **kw)

    _fails(convert, tmp_path / "out", "00000.tar", "key 00000001", field)
    _skips(convert, tmp_path / "skip", samples=1, skipped=1)


# ---- SA-1B -------------------------------------------------------------------------------------
def _sa1b_json(image_id: int) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    mask = np.zeros((16, 24), np.uint8)
    mask[2:10, 3:12] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    ann = {"id": 7 * image_id, "segmentation": {"size": [16, 24], "counts": rle["counts"].decode()},
           "bbox": [3.0, 2.0, 9.0, 8.0], "area": 72, "predicted_iou": 0.9,
           "stability_score": 0.95, "crop_box": [0.0, 0.0, 24.0, 16.0],
           "point_coords": [[5.0, 5.0]]}  # fmt: skip
    return {"image": {"image_id": image_id, "width": 24, "height": 16,
                      "file_name": f"sa_{image_id}.jpg"}, "annotations": [ann]}  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["image"].update(image_id="2"), "'image.image_id'"),
        (lambda d: d["image"].pop("height"), "'image.height'"),
        (lambda d: d["image"].update(file_name=None), "'image.file_name'"),
        (lambda d: d["annotations"][0]["segmentation"].update(counts=[1, 2]), "image_id 2: annotation id 14: field 'segmentation.counts'"),
        (lambda d: d["annotations"][0].pop("bbox"), "image_id 2: annotation id 14: missing field 'bbox'"),
        (lambda d: d["annotations"][0].update(predicted_iou="high"), "image_id 2: annotation id 14: field 'predicted_iou'"),
        (lambda d: d["annotations"][0].update(point_coords=[[1.0]]), "image_id 2: annotation id 14: field 'point_coords'"),
    ],
)  # fmt: skip
def test_sa1b_bad_record_names_file_record_and_field(
    tmp_path: Path, edit: Callable[..., Any], field: str
) -> None:
    folder = tmp_path / "sa"
    folder.mkdir()
    for i in (1, 2):
        d = _sa1b_json(i)
        if i == 2:
            edit(d)
        (folder / f"sa_{i}.jpg").write_bytes(_jpeg(value=60 * i))
        (folder / f"sa_{i}.json").write_text(json.dumps(d))

    def convert(out: Path, **kw: Any) -> Any:
        return convert_sa1b([folder], out, "train", **kw)

    _fails(convert, tmp_path / "out", "sa_2.json", field)
    _skips(convert, tmp_path / "skip", samples=1, skipped=1)
