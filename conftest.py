"""Fixtures for every test folder of the monorepo (packages/*/tests and tests/)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent


def load_script(rel: str) -> ModuleType:
    """The script at `rel` (relative to the repository root) as a fresh module, imported from
    its file: tools/ and eval_suite/ hold CLIs, not package modules, so tests cannot import
    them by name."""
    path = REPO / rel
    if not path.is_file():
        raise FileNotFoundError(f"no script {rel!r} under the repository root {REPO}")
    name = "script_" + rel.removesuffix(".py").replace("/", "_")
    spec = spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = module_from_spec(spec)
    sys.modules[name] = module  # as importlib does: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def script() -> Callable[[str], ModuleType]:
    """`script("tools/x.py")`: a repository script loaded from its file (fresh each call)."""
    return load_script
