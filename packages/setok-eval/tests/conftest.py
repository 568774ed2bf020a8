"""Fixtures shared by the setok-eval tests."""

from __future__ import annotations

import pytest

from setok_eval.toys import write_toy_suite


@pytest.fixture
def toy_suite(tmp_path):
    return write_toy_suite(tmp_path)
