"""SA-1B converter on fake SA-1B input (Shapes World scenes in SA-1B's exact on-disk layout)."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from scipy.ndimage import binary_erosion

from setokim.data import make_loader
from setokim.data.check import check_shards
from setokim.data.converters import convert_sa1b
from setokim.data.converters.sa1b import SA1BStats, Selection, iter_sa1b, select_masks
from setokim.data.rle import bbox_of, decode_mask
from setokim.data.schema import SampleAnnotation
from setokim.data.shapes_world import COLORS, Scene, Shape, render
from setokim.data.shards import iter_tar_samples, read_manifest

H, W = 96, 80  # rendered at 96 x 96, cropped to 80 columns: a non-square image
SCENES = {
    1: [("square", "red", "large", 0.3, 0.3), ("circle", "blue", "medium", 0.6, 0.65),
        ("triangle", "yellow", "small", 0.2, 0.75)],
    2: [("hexagon", "green", "large", 0.45, 0.5), ("star", "orange", "medium", 0.2, 0.2)],
    3: [("pentagon", "purple", "medium", 0.3, 0.6), ("circle", "pink", "small", 0.65, 0.25),
        ("square", "brown", "small", 0.25, 0.2)],
    4: [("circle", "red", "large", 0.5, 0.35), ("square", "green", "medium", 0.35, 0.75)],
    5: [("triangle", "blue", "large", 0.4, 0.4), ("circle", "yellow", "small", 0.7, 0.8)],
}  # fmt: skip


def rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")}


def fake_image(image_id: int) -> tuple[bytes, dict, dict]:
    """(jpg bytes, SA-1B JSON, expected) with the objects, the background, parts, a tiny and a
    full-image mask. expected: kept (objects + background, largest first), colours, all masks."""
    shapes = [Shape(s, c, z, x, y, rotation=10.0 * image_id) for s, c, z, x, y in SCENES[image_id]]
    img, vis = render(Scene(tuple(shapes), background="gray"), 96)
    img, vis = img[:, :W], vis[:, :, :W]
    objects = [m for m in vis]
    background = ~np.any(vis, axis=0)
    parts = []
    for m in objects:  # the left half of each object: a part, covered by its whole
        xs = np.nonzero(m.any(axis=0))[0]
        part = m.copy()
        part[:, (xs.min() + xs.max()) // 2 :] = False
        parts.append(part)
    tiny = np.zeros((H, W), bool)
    tiny[2:4, 2:4] = True  # 4 px < 0.001 * 96 * 80
    full = np.ones((H, W), bool)
    masks = [*objects, background, *parts, tiny, full]
    order = list(range(len(masks)))
    random.Random(image_id).shuffle(order)  # SA-1B lists masks in no area order
    anns = []
    for j, i in enumerate(order):
        r = rle(masks[i])
        x, y, w, h = (float(v) for v in mask_utils.toBbox({**r, "counts": r["counts"].encode()}))
        anns.append({"id": 1000 * image_id + j, "segmentation": r, "bbox": [x, y, w, h],
                     "area": int(masks[i].sum()), "predicted_iou": 0.9, "stability_score": 0.95,
                     "crop_box": [0.0, 0.0, float(W), float(H)], "point_coords": [[x, y]]})  # fmt: skip
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    js = {"image": {"image_id": image_id, "width": W, "height": H,
                    "file_name": f"sa_{image_id}.jpg"}, "annotations": anns}  # fmt: skip
    kept = sorted([*objects, background], key=lambda m: -int(m.sum()))
    colours = {int(m.sum()): COLORS[s.color] for m, s in zip(objects, shapes, strict=True)}
    return buf.getvalue(), js, {"kept": kept, "colours": colours, "masks": masks}


def write_tar(path: Path, ids: list[int], prefix: str = "./") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i in ids:
            jpg, js, _ = fake_image(i)
            for name, data in ((f"sa_{i}.jpg", jpg), (f"sa_{i}.json", json.dumps(js).encode())):
                info = tarfile.TarInfo(prefix + name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_folder(path: Path, ids: list[int]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i in ids:
        jpg, js, _ = fake_image(i)
        (path / f"sa_{i}.jpg").write_bytes(jpg)
        (path / f"sa_{i}.json").write_text(json.dumps(js))
    return path


def read_split(out: Path, split: str) -> dict[str, tuple[SampleAnnotation, bytes]]:
    got = {}
    for s in read_manifest(out)["splits"][split]["shards"]:
        for key, files in iter_tar_samples(out / s["name"]):
            got[key] = (SampleAnnotation.from_json(files["json"]), files["jpg"])
    return got


def oracle(masks: list[np.ndarray], sel: Selection) -> list[int]:
    """The selection rule on full boolean masks (numpy, not pycocotools)."""
    n = masks[0].size
    area = [int(m.sum()) for m in masks]
    ok = [
        i
        for i, a in enumerate(area)
        if a > 0 and sel.min_area_frac * n <= a <= sel.max_area_frac * n
    ]
    union, kept = np.zeros_like(masks[0]), []
    for i in sorted(ok, key=lambda i: (-area[i], i)):
        if len(kept) == sel.max_objects:
            break
        if (masks[i] & union).sum() <= sel.max_overlap * area[i]:
            kept.append(i)
            union |= masks[i]
    return kept  # fmt: skip


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Images 1-3 in a tar (./ member names), 4-5 in an extracted folder, converted."""
    raw = tmp_path_factory.mktemp("sa1b")
    inputs = [write_folder(raw / "sa_000001", [4, 5]), write_tar(raw / "sa_000000.tar", [1, 2, 3])]
    out = raw / "out"
    stats = SA1BStats()
    manifest = convert_sa1b(inputs, out, "train", samples_per_shard=2, stats=stats)
    return raw, out, manifest, stats


def test_keeps_objects_and_background_drops_parts_tiny_full(converted):
    raw, out, manifest, stats = converted
    assert manifest["splits"]["train"]["num_samples"] == 5 and check_shards(out) == []
    got = read_split(out, "train")
    assert sorted(got) == [f"train-sa1b-{i}" for i in range(1, 6)]
    for i in range(1, 6):
        jpg, js, exp = fake_image(i)
        ann, image = got[f"train-sa1b-{i}"]
        assert image == jpg and (ann.width, ann.height, ann.source) == (W, H, "sa1b")
        masks = [decode_mask(o.mask) for o in ann.objects]
        assert len(masks) == len(exp["kept"])
        for m, e in zip(masks, exp["kept"], strict=True):  # largest first
            np.testing.assert_array_equal(m, e)
        assert len(masks) == len(oracle(exp["masks"], Selection()))
        for o, m in zip(ann.objects, masks, strict=True):
            assert o.bbox == bbox_of(m) and o.area == m.sum() and o.name == o.category == ""
            x0, y0, x1, y1 = o.bbox
            assert x1 > x0 and y1 > y0 and m[int(y0) : int(y1), int(x0) : int(x1)].sum() == m.sum()
        by_id = {a["id"]: a for a in js["annotations"]}
        assert [by_id[a]["segmentation"] for a in ann.meta["ann_ids"]] == [
            o.mask for o in ann.objects
        ]
        assert ann.meta == {**ann.meta, "image_id": i, "file_name": f"sa_{i}.jpg",
                            "masks_total": len(exp["masks"]), "masks_kept": len(exp["kept"])}  # fmt: skip
    assert stats.images == 5
    assert stats.masks_total == sum(len(fake_image(i)[2]["masks"]) for i in range(1, 6))
    assert stats.masks_kept == sum(len(a.objects) for a, _ in got.values())


def test_select_masks_matches_numpy_rule_on_random_rectangles():
    rng = np.random.default_rng(0)
    for trial in range(20):
        masks = []
        for _ in range(int(rng.integers(1, 30))):
            m = np.zeros((40, 50), bool)
            y, x = rng.integers(0, 40), rng.integers(0, 50)
            m[y : y + rng.integers(0, 25), x : x + rng.integers(0, 30)] = True
            masks.append(m)
        sel = Selection(max_objects=int(rng.integers(1, 10)), max_overlap=float(rng.uniform(0, 0.6)),
                        min_area_frac=float(rng.uniform(0, 0.02)), max_area_frac=0.9)  # fmt: skip
        rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
        assert select_masks(rles, 40 * 50, sel) == oracle(masks, sel), trial


def test_tar_and_folder_give_identical_annotations(tmp_path):
    a = convert_sa1b([write_tar(tmp_path / "t" / "sa_000000.tar", [2, 3])], tmp_path / "a", "s")
    b = convert_sa1b([write_folder(tmp_path / "f", [3, 2])], tmp_path / "b", "s")
    assert a["splits"]["s"]["num_samples"] == b["splits"]["s"]["num_samples"] == 2
    ga, gb = read_split(tmp_path / "a", "s"), read_split(tmp_path / "b", "s")
    assert sorted(ga) == sorted(gb) == ["s-sa1b-2", "s-sa1b-3"]
    for k in ga:
        assert ga[k][0].to_json() == gb[k][0].to_json() and ga[k][1] == gb[k][1]


def test_area_rules_alone(tmp_path):
    write_folder(tmp_path / "f", [1])
    _, _, exp = fake_image(1)
    # no overlap rule: parts stay, the tiny and the full-image mask still go
    (c,) = iter_sa1b([tmp_path / "f"], selection=Selection(max_overlap=1.0))
    assert len(c.ann.objects) == len(exp["masks"]) - 2
    assert not any(
        decode_mask(o.mask).all() or decode_mask(o.mask).sum() == 4 for o in c.ann.objects
    )
    (c,) = iter_sa1b(
        [tmp_path / "f"], selection=Selection(max_overlap=1.0, min_area_frac=0.0, max_area_frac=1.0)
    )
    assert len(c.ann.objects) == len(exp["masks"])


def test_max_objects_caps_by_area(tmp_path):
    write_folder(tmp_path / "f", [1, 3])
    for c in iter_sa1b([tmp_path / "f"], selection=Selection(max_objects=2)):
        exp = fake_image(c.ann.meta["image_id"])[2]
        assert len(c.ann.objects) == 2 and c.ann.meta["masks_kept"] == 2
        for o, e in zip(c.ann.objects, exp["kept"][:2], strict=True):
            np.testing.assert_array_equal(decode_mask(o.mask), e)


def test_max_side_resizes_image_and_masks_together(tmp_path):
    write_folder(tmp_path / "f", [1, 2])
    full = {c.ann.key: c for c in iter_sa1b([tmp_path / "f"])}
    big = {c.ann.key: c for c in iter_sa1b([tmp_path / "f"], max_side=W * 2)}
    small = {c.ann.key: c for c in iter_sa1b([tmp_path / "f"], max_side=48)}
    for key, c in small.items():
        assert big[key].image == full[key].image  # no resize needed: bytes pass through
        assert big[key].ann.to_json() == full[key].ann.to_json()
        with Image.open(io.BytesIO(c.image)) as im:
            assert im.format == "JPEG" and im.size == (40, 48)
            pix = np.asarray(im.convert("RGB"), dtype=np.float32)
        assert (c.ann.width, c.ann.height) == (40, 48)
        assert c.ann.meta["orig_width"] == W and c.ann.meta["orig_height"] == H
        colours = fake_image(c.ann.meta["image_id"])[2]["colours"]
        assert len(c.ann.objects) == len(full[key].ann.objects)
        for o, f in zip(c.ann.objects, full[key].ann.objects, strict=True):
            m = decode_mask(o.mask)
            assert m.shape == (48, 40) and o.area == m.sum() and o.bbox == bbox_of(m)
            np.testing.assert_allclose(o.bbox, np.asarray(f.bbox) / 2, atol=1.0)
            if f.area in colours:  # an object: the resized image shows its colour inside its mask
                inner = binary_erosion(m, iterations=2)
                err = np.abs(pix[inner] - np.asarray(colours[f.area])).mean()
                assert err < 30, (key, err)


def test_loader_image_view_reads_kept_masks(converted):
    _, out, _, _ = converted
    got = read_split(out, "train")
    seen = 0
    for b in make_loader(out, "train", "image", 2, image_size=32, shuffle=False):
        assert b["task"] == "image" and b["pixels"].shape[1:] == (3, 32, 32)
        for j, key in enumerate(b["key"]):
            ann = got[key][0]
            n = len(ann.objects)
            assert b["object_valid"][j].sum() == n and not b["object_valid"][j, n:].any()
            for k, o in enumerate(ann.objects):
                m = Image.fromarray(decode_mask(o.mask)).resize((32, 32), Image.Resampling.NEAREST)
                np.testing.assert_array_equal(b["object_masks"][j, k].numpy(), np.asarray(m))
            seen += 1
    assert seen == 5


def bad_json(tmp_path: Path, edit) -> tuple[Path, str]:
    f = write_folder(tmp_path / "bad", [1])
    js = json.loads((f / "sa_1.json").read_text())
    edit(js)
    (f / "sa_1.json").write_text(json.dumps(js))
    return f, "sa_1.json"


def drop_json(tmp_path):
    f = write_folder(tmp_path / "bad", [1])
    (f / "sa_1.json").unlink()
    return f, "sa_1.jpg"


def drop_jpg(tmp_path):
    f = write_folder(tmp_path / "bad", [1])
    (f / "sa_1.jpg").unlink()
    return f, "sa_1.json"


def tar_missing_json(tmp_path):
    t = write_tar(tmp_path / "sa_000007.tar", [1, 2])
    with tarfile.open(t) as src, tarfile.open(tmp_path / "sa_000009.tar", "w") as dst:
        for m in src.getmembers():
            if m.name != "./sa_2.json":
                dst.addfile(m, src.extractfile(m))
    return tmp_path / "sa_000009.tar", "sa_000009.tar member sa_2"


def wrong_mask_size(js):
    js["annotations"][3]["segmentation"] = rle(np.ones((H, W + 1), bool))


def not_a_tar(tmp_path):
    (tmp_path / "sa_000000.tar").write_text("not a tar")
    return tmp_path / "sa_000000.tar", "sa_000000.tar"


BAD = {
    "no_json": (drop_json, ValueError),
    "no_image": (drop_jpg, ValueError),
    "no_image_key": (lambda p: bad_json(p, lambda js: js.pop("image")), ValueError),
    "no_annotations": (lambda p: bad_json(p, lambda js: js.pop("annotations")), ValueError),
    "mask_size": (lambda p: bad_json(p, wrong_mask_size), ValueError),
    "tar_no_json": (tar_missing_json, ValueError),
    "missing_path": (lambda p: (p / "nope.tar", "nope.tar"), FileNotFoundError),
    "not_a_tar": (not_a_tar, ValueError),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_naming_the_file(tmp_path, case):
    make, exc = BAD[case]
    path, name = make(tmp_path)
    with pytest.raises(exc, match=name.replace(".", r"\.")):
        convert_sa1b([path], tmp_path / "out", "train")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_settings_raise_naming_the_argument(tmp_path):
    f = write_folder(tmp_path / "f", [1])
    for kw, name in (({"max_objects": 0}, "max_objects"), ({"max_overlap": 1.5}, "max_overlap"),
                     ({"min_area_frac": 0.99}, "min_area_frac")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            iter_sa1b([f], selection=Selection(**kw))
    with pytest.raises(ValueError, match="max_side"):
        iter_sa1b([f], max_side=0)


def test_failed_conversion_leaves_previous_split_intact(tmp_path):
    good = write_folder(tmp_path / "a", [1, 2])
    out = tmp_path / "out"
    convert_sa1b([good], out, "train", samples_per_shard=1)
    before = read_manifest(out)
    bad, _ = drop_json(tmp_path)  # folder "bad" sorts after "a": fails after two shards
    with pytest.raises(ValueError, match="sa_1.jpg"):
        convert_sa1b(
            [good, bad], out, "train", samples_per_shard=1, selection=Selection(max_objects=1),
            overwrite=True,
        )  # fmt: skip
    assert read_manifest(out) == before and check_shards(out) == []


def test_reconversion_with_fewer_shards_removes_the_stale_ones(tmp_path):
    out = tmp_path / "out"
    convert_sa1b([write_folder(tmp_path / "a", [1, 2, 3])], out, "train", samples_per_shard=1)
    assert len(list(out.glob("train-*.tar"))) == 3
    with pytest.raises(FileExistsError, match="already holds split 'train'"):
        convert_sa1b([write_folder(tmp_path / "b", [4])], out, "train")
    convert_sa1b(
        [write_folder(tmp_path / "b", [4])], out, "train", samples_per_shard=1, overwrite=True
    )
    assert sorted(p.name for p in out.glob("train-*")) == [
        "train-000000.tar",
        "train-000000.tar.index.json",
    ]
    assert check_shards(out) == [] and not list(out.glob(".train.staging-*"))
    assert list(read_split(out, "train")) == ["train-sa1b-4"]


def test_cli_prints_summary(tmp_path, capsys, script):
    cli = script("tools/data/sa1b.py")
    write_tar(tmp_path / "sa_000000.tar", [1, 2])
    argv = ["--inputs", str(tmp_path / "sa_000000.tar"), "--out", str(tmp_path / "out"),
            "--split", "train", "--max-objects", "3", "--max-side", "48"]  # fmt: skip
    assert cli.main(argv) == 0
    total = sum(len(fake_image(i)[2]["masks"]) for i in (1, 2))
    assert f"train: 2 samples -> {tmp_path / 'out'}; 6 / {total} masks kept" in capsys.readouterr().out
    (ann, _), _ = read_split(tmp_path / "out", "train").values()
    assert (ann.width, ann.height) == (40, 48)
