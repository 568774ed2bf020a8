"""Config dataclasses for the SeTok tokenizer.

Plain dataclasses so that Hydra structured configs (experiments/conf) can use them as
schemas directly and a typo in an override fails at compose time with the key's name.
Values are checked in `__post_init__` (errors read "ClassName.field: ..."; the launcher
rewrites the class name into the key's path), so a bad value fails when the config is built.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

ENCODER_FAMILIES = ("vit", "siglip", "clip", "dinov2", "dinov2_registers", "convnext")
ENCODER_LAYERS = ("last", "penultimate")
MECHANISMS = ("dynamic", "fixed", "threshold", "resampler", "patch")
ASSIGNMENTS = ("soft", "hard")
FEATURE_NORMS = ("l2", "layernorm", "none")


def require(ok: bool, obj: object, key: str, message: str) -> None:
    """Raise `ValueError("ClassName.key: message")` unless `ok` (the config check helper)."""
    if not ok:
        raise ValueError(f"{type(obj).__name__}.{key}: {message}")


def require_choice(obj: object, key: str, choices: tuple[str, ...]) -> None:
    """`obj.key` must be one of `choices`."""
    value = getattr(obj, key)
    require(value in choices, obj, key, f"must be one of {choices}, got {value!r}")


def require_min(obj: object, low: float, *keys: str, strict: bool = False) -> None:
    """Each `obj.key` (None skipped) must be >= low (> low with `strict`)."""
    for key in keys:
        value = getattr(obj, key)
        if value is not None:
            ok = value > low if strict else value >= low
            require(ok, obj, key, f"must be {'>' if strict else '>='} {low}, got {value}")


def _default(f: dataclasses.Field) -> Any:
    """A field's default value (None when it has none)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field's type names (`X` or `X | None`), else None."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def from_dict(
    cls: type[T], data: Mapping[str, Any] | T, base: T | None = None, where: str = ""
) -> T:
    """A (nested) config dataclass from a possibly partial mapping: the one conversion.

    Keys missing from `data` keep `base`'s values (default: the class defaults), nested
    mappings recurse into nested dataclass fields over `base`'s value or the field's default
    (so a partial mapping keeps the defaults the outer class gives), as do the items of a
    `list[X]` field of dataclass X; an instance of `cls` is returned as is.
    Unknown keys and bad values raise naming them with their path (`where`, default the
    class name).
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise TypeError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data).difference(known))
    if unknown:
        raise ValueError(
            f"{where or cls.__name__}: unknown config key(s) {unknown}; known: {sorted(known)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub, path = _dataclass_in(hints[name]), f"{where}.{name}" if where else name
        if sub is not None and isinstance(value, Mapping):
            inner = getattr(base, name) if base is not None else _default(known[name])
            value = from_dict(sub, value, inner if isinstance(inner, sub) else None, path)
        elif typing.get_origin(hints[name]) is list and isinstance(value, list | tuple):
            item = _dataclass_in(typing.get_args(hints[name])[0])
            if item is not None:  # a list of dataclasses: each item built, its index named
                value = [from_dict(item, v, where=f"{path}[{i}]") for i, v in enumerate(value)]
        kwargs[name] = value
    try:
        if base is not None:
            return dataclasses.replace(base, **kwargs)  # type: ignore[type-var]
        return cls(**kwargs)
    except ValueError as err:  # "ClassName.key: ..." -> "where.key: ..."
        prefix = f"{cls.__name__}."
        if where and str(err).startswith(prefix):
            raise ValueError(f"{where}.{str(err)[len(prefix) :]}") from None
        raise
    except TypeError as err:  # a required key missing: say where
        raise TypeError(f"{where or cls.__name__}: {err}") from None


@dataclass
class EncoderConfig:
    """Which vision encoder produces the feature grid, and how.

    family: vit | siglip | clip | dinov2 | dinov2_registers | convnext (all through
        transformers).
    preset: a named tiny/base architecture used when `pretrained_path` is None.
    pretrained_path: a local directory with a transformers checkpoint (never a download);
        for convnext also an OpenCLIP checkpoint folder (setok_tokenizer.openclip).
    image_size: the square input resolution; a pretrained ViT/SigLIP/CLIP trained at another
        size gets its position embeddings interpolated (DINOv2 always interpolates).
    layer: "last" or "penultimate" hidden state.
    overrides: extra kwargs for the transformers config (e.g. hidden_size for tests).
    """

    family: str = "vit"
    preset: str = "tiny"
    pretrained_path: str | None = None
    image_size: int = 64
    layer: str = "last"
    freeze: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require_choice(self, "family", ENCODER_FAMILIES)
        require_choice(self, "layer", ENCODER_LAYERS)
        require_min(self, 1, "image_size")


@dataclass
class ClusteringConfig:
    """How the feature grid becomes clusters (paper Section 2.1, Table 5 ablations).

    mechanism: dynamic (Algorithm 1, stop="dynamic") | fixed (Algorithm 1, stop="fixed") |
        threshold (DPC-KNN of the official code) | resampler (learnable queries) |
        patch (every patch is a token).
    """

    mechanism: str = "dynamic"
    assignment: str = "hard"
    max_clusters: int = 32
    knn_k: int = 5
    kernel_scale: float | None = None
    min_scope: float = 0.05
    feature_norm: str = "l2"  # l2 | layernorm | none
    threshold: float = 0.1  # relative score threshold (mechanism=threshold)
    min_clusters: int = 2  # mechanism=threshold

    def __post_init__(self) -> None:
        for key, choices in (("mechanism", MECHANISMS), ("assignment", ASSIGNMENTS),
                             ("feature_norm", FEATURE_NORMS)):  # fmt: skip
            require_choice(self, key, choices)
        require_min(self, 2, "max_clusters")
        require_min(self, 1, "knn_k", "min_clusters")
        require_min(self, 0, "kernel_scale", strict=True)
        require(
            0 <= self.min_scope <= 1, self, "min_scope", f"must be in [0, 1], got {self.min_scope}"
        )


@dataclass
class MergerConfig:
    """The cluster merger: L transformer blocks over each cluster, then masked mean.

    enabled=False is the paper's "w/o merger" ablation (plain masked mean);
    use_pe=False is "w/o PE". relative_pe (ours, off by default) adds a second embedding of
    each member's offset from its cluster's centroid, so a token also carries its
    cluster's silhouette wherever it lies (setok_tokenizer.merger).
    """

    enabled: bool = True
    use_pe: bool = True
    relative_pe: bool = False
    num_blocks: int = 2
    num_heads: int = 2
    mlp_ratio: float = 4.0
    out_dim: int | None = None  # None keeps the encoder width

    def __post_init__(self) -> None:
        require_min(self, 0, "num_blocks")
        require_min(self, 1, "num_heads", "out_dim")
        require_min(self, 0, "mlp_ratio", strict=True)


@dataclass
class SeTokConfig:
    """The whole tokenizer: encoder → normalisation → clustering → merger."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    merger: MergerConfig = field(default_factory=MergerConfig)
