"""Stage registry: a name in the experiment config -> an object satisfying `train.Stage`.

Factories are imported lazily so that choosing "toy" never imports the tokenizer stack.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from setokim.train.stage import Stage

StageFactory = Callable[[Mapping[str, Any]], Stage]

# name -> "module:function" (lazy) or a callable registered at run time.
_REGISTRY: dict[str, str | StageFactory] = {
    "toy": "setokim.stages.toy:build",
    "quickstart": "setokim.stages.quickstart:build",
    "stage1": "setokim.stages.stage1:build",
    "stage2": "setokim.stages.stage2:build",
    "stage3": "setokim.stages.stage3:build",
    "pipeline": "setokim.stages.pipeline:build",  # not a Stage: a launcher calls .run
    "eval": "setokim.stages.evaluate:build",  # not a Stage: a launcher calls .run
    "study": "setokim.stages.study:build",  # a paper-analysis row: pipeline + eval + row.json
}


def register_stage(name: str, factory: str | StageFactory) -> None:
    """Add a stage to the registry; a name may not be registered twice."""
    if name in _REGISTRY:
        raise ValueError(f"stage name {name!r} is already registered")
    _REGISTRY[name] = factory


def available_stages() -> list[str]:
    """Sorted registered stage names."""
    return sorted(_REGISTRY)


def build_stage(name: str, cfg: Mapping[str, Any] | None = None) -> Stage:
    """Build stage `name` from its config mapping (unknown keys raise inside the stage)."""
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown stage {name!r}; available: {available_stages()}")
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module_name, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
    return factory(dict(cfg or {}))
