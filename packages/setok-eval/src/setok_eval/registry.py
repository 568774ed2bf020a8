"""Task registry: task definitions (YAML) validated on load, and the catalogue of metrics."""

from __future__ import annotations

import os
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

OUTPUT_TYPES = ("text", "box", "mask", "image", "tokens")
# Adapter method per output type; an image task may ask for "edit" instead of "generate".
DEFAULT_METHOD = {
    "text": "understand",
    "box": "ground",
    "mask": "segment",
    "image": "generate",
    "tokens": "tokenize",
}
METHODS = ("understand", "ground", "segment", "generate", "edit", "tokenize")


@dataclass(frozen=True)
class MetricInfo:
    """What a metric scores, which document fields it needs, and which direction is better."""

    outputs: tuple[str, ...]
    doc_fields: tuple[str, ...]
    higher_is_better: bool | None


METRICS: dict[str, MetricInfo] = {
    "vqa_accuracy": MetricInfo(("text",), ("answers",), True),
    "exact_match": MetricInfo(("text",), ("answer",), True),
    "cider_d": MetricInfo(("text",), ("references",), True),
    "pope_accuracy": MetricInfo(("text",), ("label",), True),
    "pope_precision": MetricInfo(("text",), ("label",), True),
    "pope_recall": MetricInfo(("text",), ("label",), True),
    "pope_f1": MetricInfo(("text",), ("label",), True),
    "pope_yes_ratio": MetricInfo(("text",), ("label",), None),
    "mme_score": MetricInfo(("text",), ("answer", "subtask", "image_id"), True),
    "rec_accuracy": MetricInfo(("box",), ("box",), True),
    "giou": MetricInfo(("mask",), ("mask",), True),
    "ciou": MetricInfo(("mask",), ("mask",), True),
    "l1": MetricInfo(("image",), ("target",), False),
    "feature_cosine": MetricInfo(("image",), ("target",), True),
    "fid": MetricInfo(("image",), ("target",), False),
    "colour_match": MetricInfo(("image",), ("caption",), True),
    "tokens_per_image": MetricInfo(("tokens",), (), None),
    "ari": MetricInfo(("tokens",), ("masks",), True),
    "mbo": MetricInfo(("tokens",), ("masks",), True),
    "hungarian_miou": MetricInfo(("tokens",), ("masks",), True),
    "prefill_flops": MetricInfo(("tokens",), (), False),
}


class TaskValidationError(ValueError):
    """A task file is malformed; the message names the file and the offending key."""


@dataclass(frozen=True)
class MetricSpec:
    """One metric of a task: `name` is how it is reported, `metric` the catalogue entry."""

    name: str
    metric: str
    higher_is_better: bool | None
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSpec:
    """A validated task definition."""

    name: str
    version: str
    family: str
    output: str
    method: str
    data_path: str
    data_version: str | None
    prompt: str
    metrics: tuple[MetricSpec, ...]
    primary: str
    higher_is_better: bool
    generation: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    source: str = ""

    def metric(self, name: str) -> MetricSpec:
        for m in self.metrics:
            if m.name == name:
                return m
        raise KeyError(f"task {self.name!r} has no metric {name!r}")

    def resolve_data(self, data_root: str | os.PathLike[str] | None = None) -> Path:
        """The document file: absolute as given, else under `data_root` (default: env
        SETOK_EVAL_DATA_ROOT, else the current directory)."""
        p = Path(self.data_path)
        if p.is_absolute():
            return p
        root = data_root if data_root is not None else os.environ.get("SETOK_EVAL_DATA_ROOT", ".")
        return Path(root) / p


_TOP_KEYS = {
    "name",
    "version",
    "family",
    "output",
    "method",
    "data",
    "prompt",
    "metrics",
    "primary",
    "higher_is_better",
    "generation",
    "description",
}
_REQUIRED = ("name", "version", "family", "output", "data", "prompt", "metrics", "primary")


def _fail(where: str, message: str) -> TaskValidationError:
    return TaskValidationError(f"{where}: {message}")


def _parse_metric(entry: Any, where: str, output: str) -> MetricSpec:
    if isinstance(entry, str):
        entry = {"metric": entry}
    if not isinstance(entry, Mapping):
        raise _fail(where, f"each entry of 'metrics' must be a name or a mapping, got {entry!r}")
    unknown = set(entry) - {"name", "metric", "higher_is_better", "args"}
    if unknown:
        raise _fail(where, f"unknown key(s) {sorted(unknown)} in a 'metrics' entry")
    metric = entry.get("metric")
    if metric not in METRICS:
        raise _fail(where, f"metrics: unknown metric {metric!r}; known: {sorted(METRICS)}")
    info = METRICS[metric]
    if output not in info.outputs:
        raise _fail(
            where, f"metrics: {metric!r} scores {info.outputs} outputs, task output is {output!r}"
        )
    args = entry.get("args", {}) or {}
    if not isinstance(args, Mapping):
        raise _fail(where, f"metrics: 'args' of {metric!r} must be a mapping")
    hib = entry.get("higher_is_better", info.higher_is_better)
    if hib is not None and not isinstance(hib, bool):
        raise _fail(where, f"metrics: 'higher_is_better' of {metric!r} must be true/false/null")
    return MetricSpec(str(entry.get("name", metric)), metric, hib, dict(args))


def parse_task(raw: Mapping[str, Any], source: str = "<memory>") -> TaskSpec:
    """Validate a task mapping (as loaded from YAML) into a TaskSpec."""
    if not isinstance(raw, Mapping):
        raise _fail(source, "a task file must hold a mapping")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise _fail(source, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    for key in _REQUIRED:
        if key not in raw or raw[key] is None or (raw[key] == "" and key != "prompt"):
            raise _fail(source, f"missing required key {key!r}")
    name = str(raw["name"])
    if not name.replace("_", "").replace("-", "").isalnum():
        raise _fail(source, f"'name' must be alphanumeric with _ or -, got {name!r}")
    output = raw["output"]
    if output not in OUTPUT_TYPES:
        raise _fail(source, f"'output' must be one of {OUTPUT_TYPES}, got {output!r}")
    method = raw.get("method", DEFAULT_METHOD[output])
    if method not in METHODS:
        raise _fail(source, f"'method' must be one of {METHODS}, got {method!r}")
    data = raw["data"]
    if isinstance(data, str):
        data = {"path": data}
    if not isinstance(data, Mapping) or "path" not in data:
        raise _fail(
            source, "'data' must be a path or a mapping with 'path' (and optional 'version')"
        )
    if set(data) - {"path", "version"}:
        raise _fail(source, f"unknown key(s) {sorted(set(data) - {'path', 'version'})} in 'data'")
    prompt = raw["prompt"]
    if not isinstance(prompt, str):
        raise _fail(source, "'prompt' must be a string template")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None]
    except ValueError as exc:
        raise _fail(source, f"'prompt' is not a valid format string: {exc}") from exc
    if any(f == "" or not f.isidentifier() for f in fields):
        raise _fail(source, "'prompt' placeholders must be named document fields like {question}")
    entries = raw["metrics"]
    if not isinstance(entries, list) or not entries:
        raise _fail(source, "'metrics' must be a non-empty list")
    metrics = tuple(_parse_metric(e, source, output) for e in entries)
    names = [m.name for m in metrics]
    if len(set(names)) != len(names):
        raise _fail(source, f"duplicate metric names in 'metrics': {names}")
    primary = raw["primary"]
    if primary not in names:
        raise _fail(source, f"'primary' {primary!r} is not one of the task's metrics {names}")
    primary_hib = next(m.higher_is_better for m in metrics if m.name == primary)
    hib = raw.get("higher_is_better", primary_hib)
    if not isinstance(hib, bool):
        raise _fail(
            source, f"'higher_is_better' must be true or false (primary {primary!r} has no default)"
        )
    generation = raw.get("generation", {}) or {}
    if not isinstance(generation, Mapping):
        raise _fail(source, "'generation' must be a mapping of generation settings")
    return TaskSpec(
        name=name,
        version=str(raw["version"]),
        family=str(raw["family"]),
        output=output,
        method=method,
        data_path=str(data["path"]),
        data_version=None if data.get("version") is None else str(data["version"]),
        prompt=prompt,
        metrics=metrics,
        primary=primary,
        higher_is_better=hib,
        generation=dict(generation),
        description=str(raw.get("description", "")),
        source=source,
    )


def load_task(path: str | os.PathLike[str]) -> TaskSpec:
    """Load and validate one task YAML file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"task file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise _fail(str(p), f"invalid YAML: {exc}") from exc
    return parse_task(raw, source=str(p))


def load_tasks(
    tasks_dir: str | os.PathLike[str], names: Iterable[str] | None = None
) -> list[TaskSpec]:
    """All tasks in a folder (sorted by name), or the named ones; unknown names are an error."""
    folder = Path(tasks_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"tasks_dir is not a folder: {folder}")
    specs = {}
    for f in sorted(folder.glob("*.yaml")):
        spec = load_task(f)
        if spec.name in specs:
            raise _fail(str(f), f"task name {spec.name!r} is defined twice")
        specs[spec.name] = spec
    if names is None:
        return [specs[k] for k in sorted(specs)]
    wanted = list(names)
    missing = [n for n in wanted if n not in specs]
    if missing:
        raise KeyError(f"unknown task(s) {missing}; available: {sorted(specs)}")
    return [specs[n] for n in wanted]
