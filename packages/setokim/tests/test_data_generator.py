"""Shapes World: determinism, mask/box consistency, annotation truth and balance."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from setokim.data.annotate import describe, vqa
from setokim.data.card import blind_baseline
from setokim.data.edits import sample_edit
from setokim.data.generate import ShapesWorld, generate_dataset
from setokim.data.rle import bbox_of, decode_mask
from setokim.data.shapes_world import SHAPES, render
from setokim.data.shards import read_manifest


def test_same_seed_gives_byte_identical_shards(tmp_path):
    a = generate_dataset(tmp_path / "a", 12, 3, 2, 64, seed=5, samples_per_shard=5)
    b = generate_dataset(tmp_path / "b", 12, 3, 2, 64, seed=5, samples_per_shard=5)
    c = generate_dataset(tmp_path / "c", 12, 3, 2, 64, seed=6, samples_per_shard=5)
    names = [s["name"] for body in a["splits"].values() for s in body["shards"]]
    assert len(names) == 3 + 1 + 1
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a["version"] == b["version"] != c["version"]
    assert (tmp_path / "a" / "train-000000.tar").read_bytes() != (
        tmp_path / "c" / "train-000000.tar"
    ).read_bytes()
    card = json.loads((tmp_path / "a" / "dataset_card.json").read_text())
    assert card["splits"]["train"]["images"] == 12 and card["info"]["seed"] == 5
    assert set(card["blind_baseline"]) == {"val", "test"}
    assert "Blind baseline" in (tmp_path / "a" / "README.md").read_text()


def test_twenty_images_generate_fast(tmp_path):
    import time

    t0 = time.perf_counter()
    generate_dataset(tmp_path, 20, 0, 0, 64, seed=0)
    assert read_manifest(tmp_path)["splits"]["train"]["num_samples"] == 20
    # generous bound: the brief asks for well under 2 s; this only catches pathologies
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("size", [64, 128, 224])
def test_masks_boxes_and_attributes_match_the_render(size):
    world = ShapesWorld(seed=3, image_size=size)
    scenes = [world.scene("train", i) for i in range(6)]
    for i, scene in enumerate(scenes):
        ann, files = world.sample("train", i, world.popular(scenes), scene)
        pixels, masks = render(scene, size)
        assert pixels.shape == (size, size, 3)
        assert 1 <= len(ann.objects) <= 8 and len(ann.objects) == len(scene.objects)
        union = np.zeros((size, size), dtype=int)
        for o, m, s in zip(ann.objects, masks, scene.objects, strict=True):
            dec = decode_mask(o.mask)
            assert np.array_equal(dec, m) and dec.sum() > 0
            assert o.bbox == bbox_of(dec)
            assert (o.color, o.category, o.corners) == (s.color, s.shape, SHAPES[s.shape])
            union += dec
        assert union.max() <= 1, "visible masks must not overlap"
        assert "png" in files and json.loads(files["json"])["key"] == f"train-{i:08d}"


def test_annotations_are_true_for_the_scene():
    world = ShapesWorld(seed=1)
    scenes = [world.scene("train", i) for i in range(40)]
    popular = world.popular(scenes)
    seen_types = Counter()
    for i, scene in enumerate(scenes):
        ann, _ = world.sample("train", i, popular, scene)
        objs = ann.objects
        pairs = {o.name for o in objs}
        for q in ann.vqa:
            seen_types[q.qtype] += 1
            assert len(q.answers) == 10 and q.answers.count(q.answer) >= 8
            if q.qtype == "color":
                shape = q.question.removeprefix("What color is the ").removesuffix("?")
                assert [o.color for o in objs if o.category == shape] == [q.answer]
            elif q.qtype == "count" and q.question == "How many shapes are there?":
                assert q.answer == str(len(objs))
            elif q.qtype == "count" and q.question.endswith("objects are there?"):
                colour = q.question.split()[2]
                assert q.answer == str(sum(o.color == colour for o in objs))
            elif q.qtype == "exist":
                name = q.question.removeprefix("Is there a ").removesuffix("?")
                assert q.answer == ("yes" if name in pairs else "no")
        for p in ann.pope:
            assert p.answer == ("yes" if p.object in pairs else "no")
        assert Counter(p.answer for p in ann.pope) == {"yes": 3, "no": 3}
        for r in ann.rec:
            target = objs[r.object_index]
            # every attribute word of the head phrase describes the target
            head = r.text.removeprefix("the ").split(" left of")[0].split(" right of")[0]
            head = head.split(" above")[0].split(" below")[0]
            for word in head.split():
                assert word in (target.color, target.category, target.size)
        for r in ann.reasonseg:
            assert 0 <= r.object_index < len(objs)
            if r.text == "the shape with the most corners":
                assert target_is_extreme([o.corners for o in objs], r.object_index)
    assert set(seen_types) == {"color", "shape", "count", "exist", "position", "compare"}


def target_is_extreme(values, index):
    return values[index] == max(values) and values.count(max(values)) == 1


def test_edits_change_the_scene_as_instructed():
    world = ShapesWorld(seed=2)
    ops = Counter()
    for i in range(40):
        scene = world.scene("train", i)
        res = sample_edit(scene, np.random.default_rng(i))
        assert res is not None
        target, text, op = res
        ops[op] += 1
        before, after = render(scene, 64)[0], render(target, 64)[0]
        assert not np.array_equal(before, after), f"{op}: {text}"
        if op == "remove":
            assert len(target.objects) == len(scene.objects) - 1
        elif op == "add":
            assert len(target.objects) == len(scene.objects) + 1
        elif op == "recolor":
            changed = [a for a, b in zip(scene.objects, target.objects, strict=True) if a != b]
            assert len(changed) == 1 and changed[0].color not in text.split()[-1:]
    assert len(ops) == 5, ops


@pytest.mark.slow  # over 5 s
def test_blind_baseline_is_near_chance():
    world = ShapesWorld(seed=4)
    train = [q for i in range(300) for q in vqa(world.scene("train", i), np.random.default_rng(i))]
    val = [
        q for i in range(200) for q in vqa(world.scene("val", i), np.random.default_rng(10_000 + i))
    ]
    base = blind_baseline(train, val)
    for qtype in ("exist", "position", "compare"):
        assert base[qtype]["by_question"] < 0.62, (qtype, base[qtype])
    for qtype in ("color", "shape"):
        assert base[qtype]["by_question"] < 0.3, (qtype, base[qtype])
    assert base["count"]["by_type"] < 0.4


def test_describe_is_unique_or_none():
    world = ShapesWorld(seed=9)
    for i in range(30):
        objs = world.scene("train", i).objects
        for j in range(len(objs)):
            d = describe(objs, j)
            if d is not None:
                words = d.split()
                hits = [o for o in objs if all(w in (o.color, o.shape, o.size) for w in words)]
                assert hits == [objs[j]]


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="train"):
        generate_dataset(tmp_path, -1, 0, 0)
    with pytest.raises(ValueError, match="split"):
        ShapesWorld().scene("bogus", 0)
