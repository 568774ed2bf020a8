"""A World decides which scenes Shapes World samples; data configs carry it to the generator."""

from __future__ import annotations

import numpy as np
import pytest

from setokim.data.config import DataConfig
from setokim.data.generate import ShapesWorld, generate_dataset
from setokim.data.shapes_world import SHAPES, SIZES, World, sample_scene
from setokim.stages.common import ensure_dataset

SMALL = World(shapes=["circle", "square"], object_scale=1.5, max_rotation=0, max_objects=3)


def test_default_world_is_the_full_world():
    world = World()
    assert world.shapes == list(SHAPES) and world.max_rotation == 360 and world.max_objects == 8
    rotations = [
        o.rotation for i in range(40) for o in sample_scene(np.random.default_rng(i)).objects
    ]
    assert max(rotations) > 90  # the default still rotates


def test_scenes_follow_the_world():
    seen = set()
    for i in range(60):
        scene = sample_scene(np.random.default_rng(i), SMALL)
        assert 1 <= len(scene.objects) <= 3
        for o in scene.objects:
            seen.add(o.shape)
            assert o.rotation == 0.0
            assert o.radius == pytest.approx(SIZES[o.size] * 1.5)
            assert o.radius <= o.cx <= 1 - o.radius and o.radius <= o.cy <= 1 - o.radius
    assert seen == {"circle", "square"}


def test_annotations_name_only_the_worlds_shapes():
    gen = ShapesWorld(seed=3, image_size=32, world=SMALL)
    named = set()
    for sample, _ in gen.iter_split("train", 40):
        for q in sample.vqa:
            if q.qtype in ("exist", "shape"):
                named |= {s for s in SHAPES if s in q.question or s in q.answer}
        for p in sample.pope:
            named |= {s for s in SHAPES if s in p.question}
        for e in sample.edit:
            assert {o.category for o in e.target_objects} <= {"circle", "square"}
    assert named == {"circle", "square"}


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"shapes": ["circle", "blob"]}, "World.shapes"),
        ({"shapes": []}, "World.shapes"),
        ({"shapes": ["star", "star"]}, "World.shapes"),
        ({"object_scale": 0}, "World.object_scale"),
        ({"object_scale": 3.0}, "World.object_scale"),
        ({"max_rotation": -1}, "World.max_rotation"),
        ({"max_objects": 9}, "World.max_objects"),
    ],
)
def test_bad_worlds_are_refused_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        World(**kwargs)


def test_world_from_json():
    assert World.from_json('{"object_scale": 1.6, "max_objects": 4}') == World(
        object_scale=1.6, max_objects=4
    )
    with pytest.raises(ValueError, match="unknown key"):
        World.from_json('{"scale": 2}')
    with pytest.raises(ValueError, match="JSON"):
        World.from_json("scale=2")


def test_manifest_records_the_world_and_another_world_is_refused(tmp_path):
    out = tmp_path / "sw"
    manifest = generate_dataset(out, train=4, val=0, test=0, image_size=32, world=SMALL)
    assert manifest["info"]["world"] == SMALL.as_dict()
    # the same world is reused as is; another one is an error naming data.world
    assert ensure_dataset(out, train=4, image_size=32, seed=0, world=SMALL) == out
    with pytest.raises(ValueError, match="data.world"):
        ensure_dataset(out, train=4, image_size=32, seed=0, world=World())


def test_data_config_builds_the_world_from_a_mapping():
    from setok_tokenizer.config import from_dict

    cfg = from_dict(DataConfig, {"world": {"shapes": ["star"], "max_objects": 2}})
    assert isinstance(cfg.world, World) and cfg.world.shapes == ["star"]
    with pytest.raises(ValueError, match="world.max_objects"):
        from_dict(DataConfig, {"world": {"max_objects": 0}})


def test_attribute_labels_index_the_worlds_words_and_refuse_others() -> None:
    from setokim.data.shapes_world import COLORS, World, attribute_labels, attribute_vocab

    world = World(shapes=["circle", "star"])
    assert attribute_vocab(world) == {"colour": list(COLORS), "shape": ["circle", "star"]}
    got = attribute_labels([["red star", "blue circle"], []], 3, world)
    assert got["colour"].tolist() == [[list(COLORS).index("red"), list(COLORS).index("blue"),
                                       -100], [-100, -100, -100]]  # fmt: skip
    assert got["shape"].tolist() == [[1, 0, -100], [-100, -100, -100]]
    with pytest.raises(ValueError, match="'square' is not a shape"):
        attribute_labels([["red square"]], 1, world)
    with pytest.raises(ValueError, match="expected 'colour shape'"):
        attribute_labels([["red"]], 1, world)
    with pytest.raises(ValueError, match="2 object names for 1 slots"):
        attribute_labels([["red star", "red star"]], 1, world)
