"""The data version a run records: the task's, else the documents', else the file's hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from setok_eval.documents import load_documents
from setok_eval.registry import MetricSpec, TaskSpec


def _task(path: Path, data_version: str | None = None) -> TaskSpec:
    return TaskSpec(
        name="toy",
        version="1",
        family="understanding",
        output="text",
        method="understand",
        data_path=str(path),
        data_version=data_version,
        prompt="{question}",
        metrics=(MetricSpec(name="exact_match", metric="exact_match", higher_is_better=True),),
        primary="exact_match",
        higher_is_better=True,
    )


def _write(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def _doc(i: int, **extra) -> dict:
    return {"id": f"d{i}", "question": "q", "answer": "a", **extra}


def test_version_comes_from_the_documents_when_they_carry_one(tmp_path):
    path = _write(tmp_path / "a.jsonl", [_doc(i, data_version="cafe01") for i in range(3)])
    assert load_documents(_task(path))[1] == "cafe01"
    # the task's explicit version still wins
    assert load_documents(_task(path, "v2"))[1] == "v2"


def test_version_falls_back_to_the_file_hash(tmp_path):
    path = _write(tmp_path / "a.jsonl", [_doc(i) for i in range(3)])
    version = load_documents(_task(path))[1]
    assert version.startswith("sha256:")
    _write(path, [_doc(i) for i in range(4)])
    assert load_documents(_task(path))[1] != version


def test_mixed_versions_are_an_error(tmp_path):
    path = _write(tmp_path / "a.jsonl", [_doc(0, data_version="x"), _doc(1, data_version="y")])
    with pytest.raises(ValueError, match="more than one data_version"):
        load_documents(_task(path))
    partial = _write(tmp_path / "b.jsonl", [_doc(0, data_version="x"), _doc(1)])
    with pytest.raises(ValueError, match="data_version"):
        load_documents(_task(partial))
