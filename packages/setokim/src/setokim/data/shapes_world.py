"""Shapes World scenes: seeded sampling of 1-8 shapes and their rendering with PIL + numpy.

A `Scene` is pure data (shape, colour, size, centre, rotation, drawing order); `render`
turns it into an RGB image plus the *visible* instance masks (later objects occlude earlier
ones). Editing a scene and rendering it again gives an exact edit target.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = "shapes-world-1"
"""Bumped when the same (seed, split, index, World) would give other bytes."""

SHAPES: dict[str, int] = {
    "circle": 0,
    "triangle": 3,
    "square": 4,
    "pentagon": 5,
    "hexagon": 6,
    "star": 10,
}
"""Shape name -> number of corners (the star's ten vertices count as its corners)."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "pink": (245, 130, 190),
    "brown": (130, 85, 45),
}

SIZES: dict[str, float] = {"small": 0.08, "medium": 0.12, "large": 0.17}
"""Size name -> circumradius as a fraction of the image side."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": (235, 235, 230),
    "black": (25, 25, 30),
    "beige": (215, 200, 170),
}

MIN_VISIBLE_FRACTION = 0.5
MIN_VISIBLE_PIXELS = 6
MAX_OBJECTS = 8
"""The most objects a scene may hold (the count questions' number words stop at eight)."""


@dataclass
class World:
    """Which scenes a Shapes World samples: the shape set, object scale, rotation, crowding.

    The default is the full world (six shapes at any rotation, up to eight objects). A
    smaller world makes shape visible at a coarse token grid: a linear probe on each
    object's true silhouette at 16x16 reads shape 0.27 in the default world and 0.91 with
    four upright shapes at 1.6x scale (benchmarks/RESULTS.md, "What Stage I puts into the
    tokens").
    shapes: names from SHAPES that objects are drawn from (questions name only these).
    object_scale: multiplies every SIZES radius (the largest object must fit the frame).
    max_rotation: rotations are uniform in [0, max_rotation) degrees; 0 draws them upright.
    max_objects: scenes hold 1..max_objects objects.
    """

    shapes: list[str] = field(default_factory=lambda: list(SHAPES))
    object_scale: float = 1.0
    max_rotation: float = 360.0
    max_objects: int = MAX_OBJECTS

    def __post_init__(self) -> None:
        shapes = [str(s) for s in self.shapes]
        self.shapes = shapes
        unknown = sorted(set(shapes) - set(SHAPES))
        if not shapes or unknown or len(set(shapes)) != len(shapes):
            raise ValueError(
                f"World.shapes: need distinct names from {list(SHAPES)}, got {list(shapes)}"
            )
        largest = max(SIZES.values()) * self.object_scale
        if not (0 < self.object_scale and largest <= 0.4):
            raise ValueError(
                f"World.object_scale: must be > 0 with the largest radius "
                f"{max(SIZES.values())} x scale <= 0.4 of the side, got {self.object_scale}"
            )
        if not 0 <= self.max_rotation <= 360:
            raise ValueError(f"World.max_rotation: must be in [0, 360], got {self.max_rotation}")
        if not 1 <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(
                f"World.max_objects: must be in 1..{MAX_OBJECTS}, got {self.max_objects}"
            )

    @classmethod
    def from_json(cls, text: str) -> World:
        """A World from a command line's JSON object, e.g. '{"object_scale": 1.6}'."""
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"world: not a JSON object: {text!r} ({err})") from None
        if not isinstance(spec, dict):
            raise ValueError(f"world: expected a JSON object, got {text!r}")
        unknown = sorted(set(spec) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"world: unknown key(s) {unknown}; known: {[f.name for f in fields(cls)]}"
            )
        return cls(**spec)

    def as_dict(self) -> dict:
        """JSON form, as recorded in a generated dataset's manifest."""
        return {
            "shapes": list(self.shapes),
            "object_scale": self.object_scale,
            "max_rotation": self.max_rotation,
            "max_objects": self.max_objects,
        }


@dataclass(frozen=True)
class Shape:
    """One object; (cx, cy) and radius are fractions of the image side."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    rotation: float = 0.0
    texture_seed: int = 0
    scale: float = 1.0  # the World's object_scale

    @property
    def radius(self) -> float:
        return SIZES[self.size] * self.scale

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Objects in drawing order (index = z order: later ones occlude earlier ones)."""

    objects: tuple[Shape, ...]
    background: str = "gray"
    textured: bool = False
    texture_seed: int = 0
    meta: dict = field(default_factory=dict, compare=False)

    def with_objects(self, objects: list[Shape] | tuple[Shape, ...]) -> Scene:
        return replace(self, objects=tuple(objects))


def shape_polygon(obj: Shape, size: int) -> list[tuple[float, float]] | None:
    """Vertices in pixels, or None for a circle (drawn as an ellipse)."""
    n = SHAPES[obj.shape]
    if n == 0:
        return None
    cx, cy, r = obj.cx * size, obj.cy * size, obj.radius * size
    rot = math.radians(obj.rotation) - math.pi / 2
    if obj.shape == "star":
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        return [
            (
                cx + radii[k] * math.cos(rot + k * math.pi / 5),
                cy + radii[k] * math.sin(rot + k * math.pi / 5),
            )
            for k in range(10)
        ]
    return [
        (cx + r * math.cos(rot + 2 * math.pi * k / n), cy + r * math.sin(rot + 2 * math.pi * k / n))
        for k in range(n)
    ]


def full_mask(obj: Shape, size: int) -> np.ndarray:
    """The whole shape as a (size, size) bool mask, ignoring occlusion."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    poly = shape_polygon(obj, size)
    if poly is None:
        cx, cy, r = obj.cx * size, obj.cy * size, obj.radius * size
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(poly, fill=255)
    return np.asarray(canvas) > 127


def visible_masks(scene: Scene, size: int) -> np.ndarray:
    """(O, size, size) bool: what remains of each object after the later ones are drawn."""
    full = [full_mask(o, size) for o in scene.objects]
    out = np.zeros((len(full), size, size), dtype=bool)
    covered = np.zeros((size, size), dtype=bool)
    for i in range(len(full) - 1, -1, -1):
        out[i] = full[i] & ~covered
        covered |= full[i]
    return out


def _noise(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    """Smooth value noise (size, size) in [-amplitude, amplitude] from a seeded coarse grid."""
    coarse = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32) * amplitude


def render(scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Render `scene` at `size` px: (uint8 (size, size, 3) image, (O, size, size) bool masks)."""
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[scene.background]
    if scene.textured:
        rng = np.random.default_rng(scene.texture_seed)
        img += _noise(rng, size, max(4, size // 8), 40.0)[..., None]
        img += rng.normal(0.0, 6.0, (size, size, 1)).astype(np.float32)
    masks = visible_masks(scene, size)
    for obj, mask in zip(scene.objects, masks, strict=True):
        colour = np.asarray(COLORS[obj.color], dtype=np.float32)
        shade = _noise(np.random.default_rng(obj.texture_seed), size, 6, 18.0)
        img[mask] = colour + shade[mask][:, None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), masks


def _visible_ok(masks: np.ndarray, fulls: list[np.ndarray]) -> bool:
    for vis, full in zip(masks, fulls, strict=True):
        area = int(full.sum())
        seen = int(vis.sum())
        if seen < MIN_VISIBLE_PIXELS or seen < MIN_VISIBLE_FRACTION * area:
            return False
    return True


def random_shape(rng: np.random.Generator, world: World | None = None) -> Shape:
    """A shape with uniform shape/colour/size and a random position inside the frame."""
    world = world or World()
    size = str(rng.choice(list(SIZES)))
    r = SIZES[size] * world.object_scale
    return Shape(
        shape=str(rng.choice(list(world.shapes))),
        color=str(rng.choice(list(COLORS))),
        size=size,
        cx=float(rng.uniform(r, 1 - r)),
        cy=float(rng.uniform(r, 1 - r)),
        rotation=float(rng.uniform(0, world.max_rotation)),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
        scale=world.object_scale,
    )


def try_place(
    scene: Scene, obj: Shape, check_size: int = 64, index: int | None = None
) -> Scene | None:
    """`scene` with `obj` inserted at z `index` (default: on top) if every object stays visible."""
    objs = list(scene.objects)
    objs.insert(len(objs) if index is None else index, obj)
    candidate = scene.with_objects(objs)
    fulls = [full_mask(o, check_size) for o in candidate.objects]
    if not _visible_ok(visible_masks(candidate, check_size), fulls):
        return None
    return candidate


def sample_scene(rng: np.random.Generator, world: World | None = None, tries: int = 30) -> Scene:
    """1..world.max_objects shapes (uniform target count), each at least half visible at 64 px."""
    world = world or World()
    target = int(rng.integers(1, world.max_objects + 1))
    scene = Scene(
        objects=(),
        background=str(rng.choice(list(BACKGROUNDS))),
        textured=bool(rng.random() < 0.5),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )
    for _ in range(target):
        for _ in range(tries):
            placed = try_place(scene, random_shape(rng, world))
            if placed is not None:
                scene = placed
                break
    return scene


def attribute_vocab(world: World) -> dict[str, list[str]]:
    """The words an object's name is made of, per attribute: every colour, the world's shapes
    (what Stage I's sub-phase 0 teaches the encoder to name)."""
    return {"colour": list(COLORS), "shape": list(world.shapes)}


def attribute_labels(
    object_names: list[list[str]], slots: int, world: World, ignore: int = -100
) -> dict[str, np.ndarray]:
    """Per attribute, a (B, slots) int64 array of each object's word index in
    `attribute_vocab(world)`; `ignore` where a slot holds no object. Names are "colour shape"
    (`Shape.name`); a word outside the world's vocabulary is an error naming it."""
    vocab = attribute_vocab(world)
    out = {key: np.full((len(object_names), slots), ignore, np.int64) for key in vocab}
    for b, names in enumerate(object_names):
        if len(names) > slots:
            raise ValueError(f"image {b}: {len(names)} object names for {slots} slots")
        for o, name in enumerate(names):
            words = name.split(" ")
            if len(words) != len(vocab):
                raise ValueError(f"object name {name!r}: expected 'colour shape'")
            for (key, known), word in zip(vocab.items(), words, strict=True):
                if word not in known:
                    raise ValueError(f"object name {name!r}: {word!r} is not a {key} of {known}")
                out[key][b, o] = known.index(word)
    return out
