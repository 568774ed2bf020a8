"""setokim.data: Shapes World, webdataset shards, task-view loaders and dataset converters.

See `schema.py` for the on-disk sample format and the collated batch layout of each task.
Heavy parts (torch loader, generator) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from setokim.data.config import DataConfig
from setokim.data.schema import (
    BATCH_FIELDS,
    COMMON_FIELDS,
    IMAGE_VIEW,
    TASKS,
    VIEWS,
    EditItem,
    ObjectAnn,
    PopeItem,
    RefItem,
    SampleAnnotation,
    VQAItem,
)

_LAZY = {
    "make_loader": "setokim.data.loader",
    "loader_from_config": "setokim.data.loader",
    "ShardLoader": "setokim.data.loader",
    "DataError": "setokim.data.decode",
    "ShapesWorld": "setokim.data.generate",
    "World": "setokim.data.shapes_world",
    "generate_dataset": "setokim.data.generate",
    "ShardWriter": "setokim.data.shards",
    "read_manifest": "setokim.data.shards",
    "dataset_version": "setokim.data.shards",
    "check_shards": "setokim.data.check",
    "merge_datasets": "setokim.data.merge",
    "MergeSource": "setokim.data.merge",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'setokim.data' has no attribute {name!r}")


__all__ = [
    "BATCH_FIELDS",
    "COMMON_FIELDS",
    "IMAGE_VIEW",
    "TASKS",
    "VIEWS",
    "DataConfig",
    "EditItem",
    "ObjectAnn",
    "PopeItem",
    "RefItem",
    "SampleAnnotation",
    "VQAItem",
    *_LAZY,
]
