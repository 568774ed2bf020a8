"""Hydra override strings: parse, canonicalise, format values, split launch-only keys.

A run's identity (its directory) is the sorted canonical list of the overrides that change
what is trained; where and how it is launched (launcher, cluster, wandb, run_root) is not.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException

# Top-level keys/groups that choose where a run executes, not what it computes.
LAUNCH_ONLY = ("launcher", "cluster", "wandb", "run_root", "hydra", "exp")

_BARE = re.compile(r"^[A-Za-z0-9_./:+-]+$")


class OverrideError(ValueError):
    """A malformed override; the message names it."""


@dataclass(frozen=True)
class ParsedOverride:
    """One `[+|++|~]key[@pkg]=value` override; `values` has several items for `a=1,2`."""

    prefix: str  # "", "+", "++" or "~"
    key: str  # dotted key or group name (with @package if given)
    values: tuple[str, ...]  # canonical value strings

    @property
    def top(self) -> str:
        return self.key.split("@", 1)[0].split(".", 1)[0].split("/", 1)[0]

    @property
    def is_sweep(self) -> bool:
        return len(self.values) > 1

    def line(self, value: str | None = None) -> str:
        if self.prefix == "~" and not self.values:
            return f"~{self.key}"
        chosen = self.values[0] if value is None else value
        return f"{self.prefix}{self.key}={chosen}"


def parse_overrides(overrides: Sequence[str]) -> list[ParsedOverride]:
    """Parse with Hydra's own grammar; a bad one raises OverrideError naming it."""
    parser = OverridesParser.create()
    parsed: list[ParsedOverride] = []
    for text in overrides:
        try:
            (override,) = parser.parse_overrides([text])
        except HydraException as err:
            raise OverrideError(f"override {text!r}: {err}") from None
        prefix = {"ADD": "+", "FORCE_ADD": "++", "DEL": "~"}.get(override.type.name, "")
        key = override.key_or_group + (f"@{override.package}" if override.package else "")
        if override.is_sweep_override():
            if override.is_hydra_override():
                raise OverrideError(f"override {text!r}: sweeps of hydra.* keys are not supported")
            values = tuple(override.sweep_string_iterator())
        elif override.type.name == "DEL" and override.value() is None:
            values = ()
        else:
            values = (override.get_value_element_as_str(),)
        parsed.append(ParsedOverride(prefix=prefix, key=key, values=values))
    return parsed


def format_value(value: Any) -> str:
    """A Python value (from a YAML sweep) as Hydra override syntax."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _BARE.match(text) and text.lower() not in {"null", "true", "false"}:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def canonical(overrides: Iterable[str]) -> list[str]:
    """Canonical, de-duplicated (last wins per key), sorted override lines."""
    by_key: dict[str, str] = {}
    for item in parse_overrides(list(overrides)):
        if item.is_sweep:
            raise OverrideError(f"override {item.key}: a sweep cannot name a single run")
        by_key[item.key] = item.line()
    return sorted(by_key.values())


def identity_overrides(overrides: Iterable[str]) -> list[str]:
    """The canonical overrides that define what is trained (launch-only keys dropped)."""
    return [line for line in canonical(overrides) if _top_of(line) not in LAUNCH_ONLY]


def _top_of(line: str) -> str:
    key = line.lstrip("+~").split("=", 1)[0]
    return key.split("@", 1)[0].split(".", 1)[0].split("/", 1)[0]
