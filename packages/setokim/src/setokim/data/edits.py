"""Edit operations on a Shapes World scene: recolour, remove, add, move, resize.

Each op returns the edited scene and an instruction; rendering the edited scene gives the
exact target image. The op is drawn uniformly among those that are possible for the scene.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from setokim.data.annotate import describe
from setokim.data.shapes_world import COLORS, SIZES, Scene, Shape, World, random_shape, try_place

EDIT_OPS = ("recolor", "remove", "add", "move", "resize")
MOVES = {"left": (-0.25, 0.0), "right": (0.25, 0.0), "up": (0.0, -0.25), "down": (0.0, 0.25)}


def _swap(scene: Scene, i: int, new: Shape) -> Scene | None:
    objs = list(scene.objects)
    del objs[i]
    return try_place(scene.with_objects(objs), new, index=i)


def _recolor(scene: Scene, i: int, d: str, rng: np.random.Generator) -> tuple[Scene, str] | None:
    old = scene.objects[i]
    colour = str(rng.choice([c for c in COLORS if c != old.color]))
    out = _swap(scene, i, replace(old, color=colour))
    text = str(
        rng.choice(
            [
                f"make the {d} {colour}",
                f"change the color of the {d} to {colour}",
                f"paint the {d} {colour}",
            ]
        )
    )
    return (out, text) if out is not None else None


def _remove(scene: Scene, i: int, d: str, rng: np.random.Generator) -> tuple[Scene, str] | None:
    if len(scene.objects) < 2:
        return None
    objs = [o for k, o in enumerate(scene.objects) if k != i]
    text = str(rng.choice([f"remove the {d}", f"delete the {d}", f"take away the {d}"]))
    return scene.with_objects(objs), text


def _add(scene: Scene, rng: np.random.Generator, world: World) -> tuple[Scene, str] | None:
    if len(scene.objects) >= world.max_objects:
        return None
    for _ in range(20):
        new = random_shape(rng, world)
        out = try_place(scene, new)
        if out is not None:
            text = str(
                rng.choice(
                    [f"add a {new.size} {new.name}", f"put a {new.size} {new.name} in the image"]
                )
            )
            return out, text
    return None


def _move(scene: Scene, i: int, d: str, rng: np.random.Generator) -> tuple[Scene, str] | None:
    old = scene.objects[i]
    for way in [list(MOVES)[k] for k in rng.permutation(len(MOVES))]:
        dx, dy = MOVES[way]
        cx, cy = old.cx + dx, old.cy + dy
        if not (old.radius <= cx <= 1 - old.radius and old.radius <= cy <= 1 - old.radius):
            continue
        out = _swap(scene, i, replace(old, cx=cx, cy=cy))
        if out is not None:
            return out, f"move the {d} {way}"
    return None


def _resize(scene: Scene, i: int, d: str, rng: np.random.Generator) -> tuple[Scene, str] | None:
    old = scene.objects[i]
    names = list(SIZES)
    k = names.index(old.size)
    for step in [int(s) for s in rng.permutation([-1, 1])]:
        if not 0 <= k + step < len(names):
            continue
        new = replace(old, size=names[k + step])
        r = new.radius
        new = replace(new, cx=min(max(new.cx, r), 1 - r), cy=min(max(new.cy, r), 1 - r))
        out = _swap(scene, i, new)
        if out is not None:
            return out, f"make the {d} {'bigger' if step > 0 else 'smaller'}"
    return None


def sample_edit(
    scene: Scene, rng: np.random.Generator, world: World | None = None
) -> tuple[Scene, str, str] | None:
    """(edited scene, instruction, op) with op uniform among feasible ones, or None."""
    named = [(i, d) for i in range(len(scene.objects)) if (d := describe(scene.objects, i))]
    for op in [EDIT_OPS[k] for k in rng.permutation(len(EDIT_OPS))]:
        if op == "add":
            res = _add(scene, rng, world or World())
        elif named:
            i, d = named[int(rng.integers(len(named)))]
            fn = {"recolor": _recolor, "remove": _remove, "move": _move, "resize": _resize}[op]
            res = fn(scene, i, d, rng)
        else:
            res = None
        if res is not None:
            return res[0], res[1], op
    return None
