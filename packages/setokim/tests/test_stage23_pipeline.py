"""The stage pipeline: exports chain into the next stage's init, a finished stage is skipped,
and a stage interrupted after training resumes from its checkpoint and exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from setokim.model.setokim import SeTokIM
from setokim.stages import build_stage
from setokim.stages.pipeline import RECORD, run_pipeline


def _steps(data: Path) -> list:
    trainer = {"max_steps": 2, "micro_batch_size": 2, "lr": 1e-3, "progress": False}
    common = {"data": {"shard_dir": str(data)}, "generate_train": 8, "cpu_threads": 1}
    return [("stage2", dict(common), trainer), ("stage3", dict(common), trainer)]


@pytest.mark.slow
def test_pipeline_chains_exports_and_skips_finished_steps(tmp_path: Path) -> None:
    steps = _steps(tmp_path / "data")
    first = run_pipeline(steps, tmp_path / "run")
    assert [r.name for r in first.steps] == ["stage2", "stage3"]
    assert not any(r.skipped for r in first.steps)
    s2, s3 = (tmp_path / "run" / n for n in ("stage2", "stage3"))
    meta = json.loads((s3 / "train" / "trainer.json").read_text())
    assert meta["stage"]["init_from"] == str((s2 / "export").resolve())
    model = SeTokIM.from_pretrained(s3 / "export")
    assert model.config.lora.enabled
    assert any("lora_" in n for n, _ in model.named_parameters())

    ckpts = sorted(p.name for p in (s2 / "train" / "checkpoints").iterdir())
    again = run_pipeline(steps, tmp_path / "run")
    assert all(r.skipped for r in again.steps) and again.last is None
    assert sorted(p.name for p in (s2 / "train" / "checkpoints").iterdir()) == ckpts

    # killed after stage3 trained, before its export: the relaunch resumes and exports
    (s3 / RECORD).unlink()
    shutil.rmtree(s3 / "export")
    third = run_pipeline(steps, tmp_path / "run")
    assert [r.skipped for r in third.steps] == [True, False]
    assert third.last is not None and third.last.resumed_from == 2
    assert (s3 / "export" / "adapter_model.safetensors").is_file()  # adapters over stage2


def test_pipeline_config_errors_name_the_step(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"steps\[1\] \(stage3\).*bogus"):
        build_stage(
            "pipeline",
            {"steps": [{"name": "stage2"}, {"name": "stage3", "params": {"bogus": 1}}]},
        )
    with pytest.raises(ValueError, match=r"steps\[0\].*max_stepz"):
        build_stage("pipeline", {"steps": [{"name": "stage2", "trainer": {"max_stepz": 1}}]})
    with pytest.raises(ValueError, match="unique"):
        run_pipeline(_steps(tmp_path)[:1] * 2, tmp_path / "run")
