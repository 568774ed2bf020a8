"""A sharded Stage II export takes the weights from the checkpoint; a frozen LLM is not
stored there (only referenced), so the export refuses it before any rank writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from setokim.stages import build_stage
from setokim.stages.stage2 import export_sharded
from setokim.train.checkpoint import FROZEN_FILE


def test_sharded_export_refuses_a_checkpoint_without_the_frozen_llm(tmp_path: Path) -> None:
    step = tmp_path / "step_00000002"
    step.mkdir()
    record = {"llm": {"path": str(tmp_path / "vicuna"), "sha256": "0" * 64}}
    (step / FROZEN_FILE).write_text(json.dumps(record))
    stage = build_stage("stage2", {"cpu_threads": 1})
    with pytest.raises(ValueError, match=r"step_00000002.*llm\.freeze.*one process"):
        export_sharded(stage, step, tmp_path / "export")
    assert not (tmp_path / "export").exists() and not (tmp_path / "export.partial").exists()
