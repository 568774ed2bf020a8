"""Make the toy helpers (eval_toys.py) importable and provide the toy-suite fixture."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_toys import write_toy_suite  # noqa: E402


@pytest.fixture
def toy_suite(tmp_path):
    return write_toy_suite(tmp_path)
