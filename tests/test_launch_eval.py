"""The eval stage as a launcher job: `+exp=eval_shapes` inline on a random tiny SeTokIM."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from setok_experiments.cli import main
from setok_experiments.job import read_status
from setokim.stages import build_stage

TASKS = ["shapes_vqa", "shapes_pope", "shapes_tokens"]
LIMIT = 2


def _args(root: Path) -> list[str]:
    return [
        "+exp=eval_shapes",
        f"run_root={root}",
        f"stage.params.tasks=[{','.join(TASKS)}]",
        f"stage.params.limit={LIMIT}",
        "stage.params.n_resamples=20",
        "stage.params.progress=false",
    ]


def _cached_lines(run_dir: Path) -> int:
    files = (run_dir / "eval" / "predictions").glob("*/rank*.jsonl")
    return sum(len(f.read_text().splitlines()) for f in files)


@pytest.mark.slow  # over 5 s
def test_eval_job_writes_results_and_relaunch_reuses_the_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "runs"
    assert main(_args(root)) == 0
    out = capsys.readouterr().out
    assert "COMPLETED" in out
    (run_dir,) = sorted(p.parent for p in (root / "eval_shapes").glob("*/config.yaml"))
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(results["tasks"]) == set(TASKS)
    for name, entry in results["tasks"].items():
        assert entry["n"] == LIMIT, name
        value = entry["metrics"][entry["primary"]]["value"]
        assert isinstance(value, float) and math.isfinite(value), name
    assert results["tasks"]["shapes_vqa"]["data_version"].startswith("shapes_world:")
    assert (run_dir / "eval_data" / "data" / "eval" / "shapes_export.json").is_file()
    status = read_status(run_dir)
    assert status is not None and status["state"] == "COMPLETED"
    assert status["step"] == LIMIT * len(TASKS)
    assert _cached_lines(run_dir) == LIMIT * len(TASKS)

    # Relaunch: same run dir, every prediction comes from the cache (none appended).
    assert main(_args(root)) == 0
    capsys.readouterr()
    status = read_status(run_dir)
    assert status is not None and status["state"] == "COMPLETED" and status["attempts"] == 2
    assert _cached_lines(run_dir) == LIMIT * len(TASKS)
    again = json.loads((run_dir / "eval" / "results.json").read_text())
    for name in TASKS:
        assert again["tasks"][name]["metrics"] == results["tasks"][name]["metrics"]


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"tiny_random": False}, "checkpoint"),
        ({"tiny_random": True, "export": {"answers": "vqav2_val"}}, "answers"),
        ({"tiny_random": True, "shard_dir": None}, "shard_dir"),
        ({"tiny_random": True, "limit": 0}, "limit"),
        ({"tiny_random": True, "colour": 1}, "colour"),
    ],
)
def test_eval_stage_rejects_bad_params_naming_them(params: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        build_stage("eval", params)


@pytest.mark.slow  # over 5 s
def test_eval_stage_build_does_not_import_setok_eval() -> None:
    import subprocess

    code = (
        "import sys; from setokim.stages import build_stage; "
        "build_stage('eval', {'tiny_random': True}); "
        "assert 'setok_eval' not in sys.modules, 'imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
