"""Text for every task from a Shapes World scene: captions, VQA, POPE, REC, reasoning
segmentation, text-to-image prompts and a chat turn list. Deterministic given the rng.

Balanced answers: a model that sees only the question text must stay near chance, so every
VQA question type is sampled with its answer distribution flat *given the wording*:
yes/no types draw the answer first (50/50) and never put a word in the question that gives
it away (no size words in size comparisons); colour/shape answers are uniform because
scene attributes are; count questions use only templates whose answer can be flattened
exactly (see `count_question`). The dataset card measures this (`blind_baseline`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from setokim.data.schema import PopeItem, RefItem, VQAItem
from setokim.data.shapes_world import COLORS, SHAPES, SIZES, Scene, Shape, World

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"]
SYNONYMS: dict[str, list[str]] = {
    **{str(i): [w] for i, w in enumerate(NUMBER_WORDS)},
    "yes": ["yeah"],
    "no": ["nope"],
    "circle": ["round"],
    "square": ["box"],
    "purple": ["violet"],
    "star": ["star shape"],
}
ANSWER_SPACE: dict[str, list[str]] = {
    "color": list(COLORS),
    "shape": list(SHAPES),
    "count": [str(i) for i in range(9)],
    "exist": ["yes", "no"],
    "position": ["yes", "no"],
    "compare": ["yes", "no"],
}
COLOR_THINGS = {
    "red": "a ripe strawberry",
    "green": "fresh grass",
    "blue": "the clear sky",
    "yellow": "a banana",
    "purple": "a bunch of grapes",
    "orange": "a pumpkin",
    "pink": "a flamingo",
    "brown": "chocolate",
}
SHAPE_HINTS = {
    "circle": "the shape that could roll like a wheel",
    "triangle": "the shape like a slice of pizza",
    "square": "the shape of a chessboard square",
    "pentagon": "the shape of home plate in baseball",
    "hexagon": "the shape of a honeycomb cell",
    "star": "the shape that twinkles in the night sky",
}
MARGIN = 0.08
SIZE_RANK = {name: i for i, name in enumerate(SIZES)}


def plural(shape: str) -> str:
    return shape + "es" if shape.endswith("x") else shape + "s"


def where(o: Shape) -> str:
    """A 3x3 grid position name ("top left", "center", ...)."""
    row = ["top", "", "bottom"][min(2, int(o.cy * 3))]
    col = ["left", "", "right"][min(2, int(o.cx * 3))]
    return " ".join(p for p in (row, col) if p) or "center"


def describe(objs: Sequence[Shape], i: int, use_size: bool = True) -> str | None:
    """Shortest attribute phrase that names object i alone ("red circle"), else None.

    use_size=False never names a size (for questions about size, where it would leak)."""
    o = objs[i]
    fields_order = [("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape")]
    for fields in fields_order if use_size else fields_order[:2]:
        key = tuple(getattr(o, f) for f in fields)
        if sum(tuple(getattr(p, f) for f in fields) == key for p in objs) == 1:
            return " ".join(key)
    return None


def left_of(a: Shape, b: Shape) -> bool:
    return a.cx < b.cx - MARGIN


def above(a: Shape, b: Shape) -> bool:
    return a.cy < b.cy - MARGIN


RELATIONS = {
    "left of": left_of,
    "right of": lambda a, b: left_of(b, a),
    "above": above,
    "below": lambda a, b: above(b, a),
}


def bg_phrase(scene: Scene) -> str:
    return f"{'textured ' if scene.textured else ''}{scene.background} background"


def _group(objs: Sequence[Shape]) -> list[str]:
    counts = Counter(o.name for o in objs)
    return [
        f"{'a' if n == 1 else NUMBER_WORDS[n]} {name if n == 1 else plural(name)}"
        for name, n in counts.items()
    ]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Three levels of detail: short, medium (what), detailed (what, how big, where)."""
    objs = scene.objects
    n = len(objs)
    noun = "shape" if n == 1 else "shapes"
    short = [
        f"{NUMBER_WORDS[n].capitalize()} {noun} on a {bg_phrase(scene)}.",
        f"An image with {NUMBER_WORDS[n]} {noun}.",
        f"A picture of {NUMBER_WORDS[n]} colored {noun}.",
    ]
    medium = [
        f"{_join(_group(objs)).capitalize()}.",
        f"There is {_join(_group(objs))} on a {bg_phrase(scene)}.",
    ]
    details = [f"a {o.size} {o.name} at the {where(o)}" for o in objs]
    detailed = [
        f"{_join(details).capitalize()}, on a {bg_phrase(scene)}.",
        f"On a {bg_phrase(scene)} there is {_join(details)}.",
    ]
    return [str(rng.choice(short)), str(rng.choice(medium)), str(rng.choice(detailed))]


def ten_answers(answer: str, qtype: str, rng: np.random.Generator) -> list[str]:
    """Ten VQAv2-style answers: 8-10 canonical, the rest synonyms, at most one disagreement
    (so a wrong answer never earns more than 1/3 VQA accuracy, and a blind guess gains
    little from the disagreements)."""
    main = int(rng.integers(8, 11))
    others = [a for a in ANSWER_SPACE[qtype] if a != answer]
    alt = SYNONYMS.get(answer, [])
    out = [answer] * main
    for k in range(10 - main):
        if k == 0 and rng.random() < 0.3:
            out.append(str(rng.choice(others)))
        else:
            out.append(str(rng.choice(alt)) if alt else answer)
    return [out[k] for k in rng.permutation(10)]


def _q(question: str, answer: str, qtype: str, rng: np.random.Generator) -> VQAItem:
    return VQAItem(
        question=question, answer=answer, answers=ten_answers(answer, qtype, rng), qtype=qtype
    )


AXES = {"left of": (0, -1.0), "right of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}
"""Relation -> (axis: 0 = x, 1 = y; sign: which direction counts as the relation)."""


def relative_counts(objs: Sequence[Shape]) -> dict[int, list[str]]:
    """Unambiguous "How many objects are <rel> the <ref>?" questions, keyed by answer.

    A question is kept only when no other object's centre lies within MARGIN of the
    reference along that axis, so every object is clearly on one side."""
    out: dict[int, list[str]] = {}
    for j in range(len(objs)):
        ref = describe(objs, j)
        if ref is None:
            continue
        for rel, (axis, sign) in AXES.items():
            at = (objs[j].cx, objs[j].cy)[axis]
            offsets = [sign * ((o.cx, o.cy)[axis] - at) for i, o in enumerate(objs) if i != j]
            if any(abs(d) <= MARGIN for d in offsets):
                continue
            answer = sum(d > 0 for d in offsets)
            out.setdefault(answer, []).append(f"How many objects are {rel} the {ref}?")
    return out


def count_question(
    objs: Sequence[Shape], rng: np.random.Generator, max_objects: int = len(NUMBER_WORDS) - 1
) -> tuple[str, int] | None:
    """One count question (text, answer), or None, with the answer flat given the wording.

    Half the time "How many shapes are there?" (answer = number of objects, uniform over
    1..max_objects because scene sizes are). Otherwise a relative count "How many objects
    are left of the red circle?": the answer k in 0..max_objects-1 is drawn *first* with
    weight 1/(max_objects - k) and the question is kept only if this scene has one with
    that answer (no retry). A scene of n objects has answers 0..n-1, so P(k) is
    proportional to P(k drawn) * P(n > k) = const: flat, whatever the reference phrase.
    Attribute counts ("How many red objects?") are left out: with uniform attributes their
    answers are mostly 0 or 1, which a blind model would learn from the wording.
    """
    if not 1 <= max_objects < len(NUMBER_WORDS):
        raise ValueError(f"max_objects must be in 1..{len(NUMBER_WORDS) - 1}, got {max_objects}")
    if rng.random() < 0.5:
        return "How many shapes are there?", len(objs)
    weights = np.array([1.0 / (max_objects - k) for k in range(max_objects)])
    k = int(rng.choice(max_objects, p=weights / weights.sum()))
    texts = relative_counts(objs).get(k)
    if not texts:
        return None
    return texts[int(rng.integers(len(texts)))], k


def vqa(scene: Scene, rng: np.random.Generator, world: World | None = None) -> list[VQAItem]:
    """At most one question of each type: color, shape, count, exist, position, compare.

    world: what the scene sampler draws from: the count balance depends on its
    max_objects, and absent objects are named from its shapes only."""
    world = world or World()
    objs = scene.objects
    out: list[VQAItem] = []
    shape_counts = Counter(o.shape for o in objs)
    color_counts = Counter(o.color for o in objs)
    uniq_shape = [o for o in objs if shape_counts[o.shape] == 1]
    if uniq_shape:
        o = uniq_shape[int(rng.integers(len(uniq_shape)))]
        out.append(_q(f"What color is the {o.shape}?", o.color, "color", rng))
    uniq_color = [o for o in objs if color_counts[o.color] == 1]
    if uniq_color:
        o = uniq_color[int(rng.integers(len(uniq_color)))]
        out.append(_q(f"What shape is the {o.color} object?", o.shape, "shape", rng))
    count = count_question(objs, rng, world.max_objects)
    if count is not None:
        out.append(_q(count[0], str(count[1]), "count", rng))
    # exist: yes/no 50/50; half of the negatives share an attribute with a present object
    present = {(o.color, o.shape) for o in objs}
    if rng.random() < 0.5:
        c, s = sorted(present)[int(rng.integers(len(present)))]
        out.append(_q(f"Is there a {c} {s}?", "yes", "exist", rng))
    else:
        absent = [(c, s) for c in COLORS for s in world.shapes if (c, s) not in present]
        near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        pool = near if near and rng.random() < 0.5 else absent
        c, s = pool[int(rng.integers(len(pool)))]
        out.append(_q(f"Is there a {c} {s}?", "no", "exist", rng))
    named = [(i, d) for i in range(len(objs)) if (d := describe(objs, i)) is not None]
    pairs = [
        (a, b, rel)
        for ia, a in named
        for ib, b in named
        if ia != ib
        for rel, fn in RELATIONS.items()
        if fn(objs[ia], objs[ib])
    ]
    if pairs:
        a, b, rel = pairs[int(rng.integers(len(pairs)))]
        if rng.random() < 0.5:
            out.append(_q(f"Is the {a} {rel} the {b}?", "yes", "position", rng))
        else:
            opposite = {
                "left of": "right of",
                "right of": "left of",
                "above": "below",
                "below": "above",
            }
            out.append(_q(f"Is the {a} {opposite[rel]} the {b}?", "no", "position", rng))
    # size comparisons name objects without size words ("the large x" would give it away)
    plain = [(i, d) for i in range(len(objs)) if (d := describe(objs, i, use_size=False))]
    bigger = [
        (a, b)
        for ia, a in plain
        for ib, b in plain
        if SIZE_RANK[objs[ia].size] > SIZE_RANK[objs[ib].size]
    ]
    if bigger:
        a, b = bigger[int(rng.integers(len(bigger)))]
        if rng.random() < 0.5:
            out.append(_q(f"Is the {a} bigger than the {b}?", "yes", "compare", rng))
        else:
            out.append(_q(f"Is the {b} bigger than the {a}?", "no", "compare", rng))
    return out


def pope(
    scene: Scene,
    rng: np.random.Generator,
    popular: Sequence[tuple[str, str]],
    shapes: Sequence[str] = tuple(SHAPES),
) -> list[PopeItem]:
    """For each POPE split one positive and one negative probe (exactly 50% yes).

    random: any absent (colour, shape); popular: among the absent ones most frequent in the
    split (`popular`, most frequent first); adversarial: absent ones that share a colour or
    shape with a present object (the look-alikes a hallucinating model would claim).
    """
    present = sorted({(o.color, o.shape) for o in scene.objects})
    absent = [(c, s) for c in COLORS for s in shapes if (c, s) not in set(present)]
    pools = {
        "random": absent,
        "popular": [p for p in popular if p not in set(present)][:3] or absent,
        "adversarial": [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        or absent,
    }
    out = []
    for split, pool in pools.items():
        pc, ps = present[int(rng.integers(len(present)))]
        nc, ns = pool[int(rng.integers(len(pool)))]
        items = [
            PopeItem(f"Is there a {pc} {ps} in the image?", "yes", split, f"{pc} {ps}"),
            PopeItem(f"Is there a {nc} {ns} in the image?", "no", split, f"{nc} {ns}"),
        ]
        out.extend(items[k] for k in rng.permutation(2))
    return out


def referring(scene: Scene, rng: np.random.Generator, limit: int = 3) -> list[RefItem]:
    """Referring expressions: unique attribute phrases and relations to a landmark
    ("the red triangle left of the circle"); at most `limit`, relational ones first."""
    objs = scene.objects
    simple = [RefItem(f"the {d}", i) for i in range(len(objs)) if (d := describe(objs, i))]
    relational = []
    groups: dict[str, list[int]] = {}
    for i, o in enumerate(objs):
        groups.setdefault(o.name, []).append(i)
    for name, members in groups.items():
        if len(members) < 2:
            continue
        for j in range(len(objs)):
            land = describe(objs, j)
            if land is None or j in members:
                continue
            for rel, fn in RELATIONS.items():
                hits = [i for i in members if fn(objs[i], objs[j])]
                if len(hits) == 1:
                    relational.append(RefItem(f"the {name} {rel} the {land}", hits[0]))
    rel_pick = [relational[k] for k in rng.permutation(len(relational))][:1]
    simple_pick = [simple[k] for k in rng.permutation(len(simple))]
    return (rel_pick + simple_pick)[:limit]


def _unique_extreme(objs: Sequence[Shape], values: list[float], largest: bool) -> int | None:
    order = sorted(range(len(objs)), key=lambda i: values[i], reverse=largest)
    if len(order) < 2 or values[order[0]] == values[order[1]]:
        return None
    return order[0]


def reasoning(scene: Scene, rng: np.random.Generator, limit: int = 2) -> list[RefItem]:
    """Queries whose object must be inferred (most corners, biggest, colour of a banana...).
    Only queries with exactly one answer are produced; `answer` explains the choice."""
    objs = scene.objects
    cands: list[RefItem] = []
    corners = [float(SHAPES[o.shape]) for o in objs]
    sizes = [float(SIZE_RANK[o.size]) for o in objs]
    for largest, text in (
        (True, "the shape with the most corners"),
        (False, "the shape with the fewest corners"),
    ):
        i = _unique_extreme(objs, corners, largest)
        if i is not None:
            cands.append(RefItem(text, i, f"the {objs[i].name}, with {int(corners[i])} corners"))
    for largest, text in ((True, "the biggest object"), (False, "the smallest object")):
        i = _unique_extreme(objs, sizes, largest)
        if i is not None:
            cands.append(RefItem(text, i, f"the {objs[i].name}, it is {objs[i].size}"))
    for edge, vals in (
        ("top", [-o.cy for o in objs]),
        ("bottom", [o.cy for o in objs]),
        ("left", [-o.cx for o in objs]),
        ("right", [o.cx for o in objs]),
    ):
        order = sorted(range(len(objs)), key=lambda i: vals[i], reverse=True)
        if len(order) >= 2 and vals[order[0]] - vals[order[1]] > MARGIN:
            i = order[0]
            cands.append(
                RefItem(f"the object closest to the {edge} edge", i, f"the {objs[i].name}")
            )
    color_counts = Counter(o.color for o in objs)
    shape_counts = Counter(o.shape for o in objs)
    for i, o in enumerate(objs):
        if color_counts[o.color] == 1:
            cands.append(
                RefItem(
                    f"the object with the color of {COLOR_THINGS[o.color]}",
                    i,
                    f"the {o.name}, it is {o.color}",
                )
            )
        if shape_counts[o.shape] == 1:
            cands.append(RefItem(SHAPE_HINTS[o.shape], i, f"the {o.name}"))
    return [cands[k] for k in rng.permutation(len(cands))][:limit]


def conversation(
    caption: str, items: Sequence[VQAItem], rng: np.random.Generator
) -> list[dict[str, str]]:
    """A LLaVA-style chat: describe the image, then up to two questions."""
    turns = [
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": caption},
    ]
    for k in rng.permutation(len(items))[:2]:
        turns.append({"from": "human", "value": items[k].question})
        turns.append({"from": "gpt", "value": items[k].answer})
    return turns
