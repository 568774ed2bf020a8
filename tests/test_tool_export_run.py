"""tools/export_run.py: a launcher run dir of Stage I -> the parts Stage II initialises from."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from setok_experiments.cli import main

REPO = Path(__file__).resolve().parents[1]
# The tool as a module from its file (it is a script, not an installed package).
_spec = importlib.util.spec_from_file_location("export_run", REPO / "tools" / "export_run.py")
assert _spec is not None and _spec.loader is not None
_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tool)
export_run = _tool.export_run

STAGE1 = [
    "+exp=stage1_shapes",
    "trainer.max_steps=3",
    "trainer.ckpt_every=1",
    "trainer.log_every=1",
    "trainer.micro_batch_size=2",
    "trainer.warmup_steps=0",
    "stage.params.subphase0_batches=1",  # one step of each sub-phase
    "stage.params.subphase1_batches=1",
    "stage.params.generate_train=8",
]


@pytest.mark.slow
def test_stage1_run_exports_loadable_parts_and_bad_dirs_are_named(tmp_path: Path) -> None:
    from setokim.stages.stage1 import load_parts

    assert main([*STAGE1, f"run_root={tmp_path / 'runs'}"]) == 0
    (run_dir,) = [p.parent for p in (tmp_path / "runs" / "stage1_shapes").glob("*/config.yaml")]
    out = export_run(run_dir, tmp_path / "export")
    # the recipe trains the token painter, so it is exported beside the other parts
    assert sorted(p.name for p in out.iterdir()) == [
        "diffusion",
        "mask_decoder",
        "painter",
        "tokenizer",
    ]
    model = load_parts(out)
    assert sum(p.numel() for p in model.parameters()) > 0 and model.painter is not None
    # an earlier step exports too, and the CLI names what is wrong with a bad run dir
    first = run_dir / "checkpoints" / "step_00000002"  # the recipe keeps the last two
    assert export_run(run_dir, tmp_path / "export1", first).is_dir()
    bad = subprocess.run(
        [sys.executable, str(REPO / "tools" / "export_run.py"), str(tmp_path), "--out", "x"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "no config.yaml" in bad.stderr
