"""Shapes World VQA balance: a question-only model stays near chance for every type."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from setokim.data.annotate import SYNONYMS, count_question, relative_counts, ten_answers
from setokim.data.card import build_card
from setokim.data.generate import ShapesWorld
from setokim.data.shapes_world import Shape

MARGIN_OVER_CHANCE = 0.08


def _split(world: ShapesWorld, split: str, count: int):
    return [sample for sample, _ in world.iter_split(split, count)]


@pytest.mark.slow  # over 5 s
def test_blind_baselines_are_within_margin_of_chance():
    # 300 rendered images through the real generator; baselines from the card itself. Most
    # go to the held-out split: the majority answer is fitted well from few, while the
    # score's noise shrinks with the evaluated count. "chance_vqa" is a random guess's VQA
    # accuracy, the fair reference for a VQA-accuracy baseline.
    world = ShapesWorld(seed=11)
    card = build_card({"train": _split(world, "train", 100), "val": _split(world, "val", 200)}, {})
    base = card["blind_baseline"]["val"]
    assert set(base) == {"color", "shape", "count", "exist", "position", "compare"}
    for qtype, r in base.items():
        assert r["n"] >= 40, (qtype, r)
        for key in ("by_type", "by_question"):
            assert r[key] <= r["chance_vqa"] + MARGIN_OVER_CHANCE, (qtype, key, r)
        assert r["chance"] <= r["chance_vqa"] < r["chance"] + 0.05, (qtype, r)


def test_count_answers_are_spread_and_true():
    world = ShapesWorld(seed=12)
    answers: Counter[int] = Counter()
    for i in range(150):
        objs = world.scene("train", i).objects
        got = count_question(objs, np.random.default_rng(i))
        if got is None:
            continue
        text, k = got
        answers[k] += 1
        if text == "How many shapes are there?":
            assert k == len(objs)
        else:
            assert text in relative_counts(objs)[k]
    assert len(answers) >= 8, answers
    assert max(answers.values()) / sum(answers.values()) < 0.25, answers


def test_relative_count_is_exact_and_skips_ambiguous_references():
    a = Shape("circle", "red", "small", 0.2, 0.5)
    b = Shape("square", "blue", "small", 0.5, 0.2)
    c = Shape("star", "green", "small", 0.8, 0.8)
    got = relative_counts([a, b, c])
    assert "How many objects are left of the star?" in got[2]
    assert "How many objects are right of the circle?" in got[2]
    assert "How many objects are above the circle?" in got[1]
    # image y grows downwards: the star is at the bottom, the square at the top
    assert "How many objects are above the star?" in got[2]
    assert "How many objects are below the square?" in got[2]
    assert "How many objects are below the star?" in got[0]
    # b's centre is within the margin of a's along x: no left/right count about a or b
    near = Shape("square", "blue", "small", 0.25, 0.9)
    texts = {t for ts in relative_counts([a, near]).values() for t in ts}
    assert not any("left of" in t or "right of" in t for t in texts)


def test_ten_answers_have_at_most_one_disagreement():
    rng = np.random.default_rng(0)
    for answer, qtype in [("triangle", "shape"), ("3", "count"), ("red", "color"), ("no", "exist")]:
        for _ in range(50):
            out = ten_answers(answer, qtype, rng)
            assert len(out) == 10 and out.count(answer) >= 8
            wrong = [x for x in out if x != answer and x not in SYNONYMS.get(answer, [])]
            assert len(wrong) <= 1, out


def test_count_question_rejects_bad_max_objects():
    with pytest.raises(ValueError, match="max_objects"):
        count_question([], np.random.default_rng(0), max_objects=0)
