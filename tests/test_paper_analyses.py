"""The paper's analyses (Table 5, Figure 7, Table 8, Table 9) as study arrays and their report.

Unit tier: the recipes compose +exp=setokim_shapes at every budget, the budget caps and the
grid scaling, and the report on hand-written rows (paired tests, reference rows, the paper's
column, the CLI). Slow: the report page in headless Chromium; a local array at budget=smoke
end to end, its report written by the job that waits for the array, then a relaunch that
trains nothing.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from setok_eval.metrics.pope import pope_confusion
from setok_experiments.cli import main
from setok_experiments.plan import build_plan
from setok_experiments.report import (
    build_table,
    collect_rows,
    csv_text,
    markdown,
    write_report,
)
from setokim.stages.study import StudyConfig, budgeted_steps, scaled_clusters

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- recipes
@pytest.mark.slow  # every row's three stages are built to validate them (seconds each)
@pytest.mark.parametrize(
    ("exp", "rows"),
    [
        ("ablation_clustering", ["dynamic_hard", "dynamic_soft", "threshold", "fixed_576",
                                 "fixed_256", "fixed_64", "fixed_8", "resampler"]),
        ("ablation_encoder", ["vit", "convnext"]),
        ("ablation_components", ["full", "wo_pe", "wo_merger"]),
        ("llava_setok", ["llava_patch", "llava_setok"]),
    ],
)  # fmt: skip
def test_each_analysis_composes_the_setokim_recipe(
    exp: str, rows: list[str], tmp_path: Path
) -> None:
    recipe = build_plan("setokim_shapes", [f"run_root={tmp_path}"]).jobs[0].config.stage.params
    plan = build_plan(exp, [f"run_root={tmp_path}", "budget=smoke"])
    assert [j.name for j in plan.jobs] == rows
    for job in plan.jobs:
        params = job.config.stage.params
        assert job.config.stage.name == "study"
        # The recipe's pipeline, step for step (trainer settings and stage names): composed.
        assert [s["name"] for s in params["steps"]] == [s["name"] for s in recipe["steps"]]
        assert [s["trainer"] for s in params["steps"]] == [s["trainer"] for s in recipe["steps"]]
        assert params["budget"]["name"] == "smoke"
        assert params["report"]["baseline"] == rows[0]


@pytest.mark.slow
def test_budgets_differ_only_in_what_they_cap(tmp_path: Path) -> None:
    smoke = build_plan("ablation_components", [f"run_root={tmp_path}", "budget=smoke"])
    small = build_plan("ablation_components", [f"run_root={tmp_path}", "budget=small"])
    full = build_plan("ablation_components", [f"run_root={tmp_path}"])
    caps = [p.jobs[0].config.stage.params["budget"]["max_steps"] for p in (smoke, small, full)]
    assert caps[0]["stage1"] < caps[1]["stage1"] and caps[2] == {}
    dirs = {p.jobs[0].run_dir for p in (smoke, small, full)}
    assert len(dirs) == 3  # a budget is part of a row's identity


def test_budget_caps_steps_and_scales_the_paper_cluster_counts() -> None:
    steps = [
        {"name": "stage1", "params": {"subphase0_batches": 8, "subphase1_batches": 24,
                                      "tokenizer": {}},
         "trainer": {"max_steps": 40, "warmup_steps": 4}},
        {"name": "stage2", "params": {}, "trainer": {"max_steps": 300, "warmup_steps": 30}},
    ]  # fmt: skip
    cfg = StudyConfig(trainer={}, steps=steps, eval={}, paper_clusters=64)
    cfg.budget.max_steps = {"stage1": 10}
    out = budgeted_steps(cfg, grid_tokens=64)
    assert out[0]["trainer"] == {"max_steps": 10, "warmup_steps": 1}
    assert out[0]["params"]["subphase1_batches"] == 6
    assert out[0]["params"]["subphase0_batches"] == 2
    assert out[0]["params"]["tokenizer"]["clustering"]["max_clusters"] == 7  # 64 x 64 / 576
    assert out[1] == steps[1] and steps[0]["trainer"]["max_steps"] == 40  # input untouched
    assert [scaled_clusters(k, 64) for k in (576, 256, 64, 8)] == [64, 28, 7, 2]
    assert [scaled_clusters(k, 256) for k in (576, 256, 64, 8)] == [256, 114, 28, 4]


# ---------------------------------------------------------------- report on written rows
SPEC: dict[str, Any] = {
    "title": "Table T",
    "baseline": "base",
    "dynamic": ["base"],
    "columns": [
        {"name": "#Cluster", "measure": "tokens", "paper": "#Cluster"},
        {"name": "TFLOPs", "measure": "tflops_tiny", "higher_is_better": False},
        {"name": "VQA acc", "task": "shapes_vqa", "metric": "vqa_accuracy", "paper": "OK-VQA"},
        {"name": "position acc", "task": "shapes_vqa", "metric": "vqa_accuracy",
         "subset": {"question_type": ["position"]}},
        {"name": "edit L1", "task": "shapes_edit", "metric": "l1"},
        {"name": "POPE F1", "task": "shapes_pope", "metric": "pope_f1"},
    ],
    "paper": {"base": {"#Cluster": "25*", "OK-VQA": 60.2}, "better": {"OK-VQA": 52.1}},
}  # fmt: skip
N = 40


def _docs() -> list[dict[str, Any]]:
    out = []
    for i in range(N):
        qtype, answer = ("position", "yes") if i % 4 == 0 else ("color", "red")
        out.append({"id": f"q{i:03d}", "image": f"img/{i % 8}.png", "question": f"q{i}?",
                    "question_type": qtype, "answers": [answer] * 10})  # fmt: skip
    return out


def _task(metric: str, states: list[float], hib: bool) -> dict[str, Any]:
    value = float(np.mean(states))
    return {
        "family": "x", "version": 1, "output": "text", "data_version": "v1", "n": N,
        "primary": metric, "higher_is_better": hib,
        "metrics": {metric: {"value": value, "ci95": [value - 0.1, value + 0.1], "n": N,
                             "higher_is_better": hib, "reducer": "mean", "details": {}}},
        "items": {metric: {"ids": [f"q{i:03d}" for i in range(N)], "reducer": "mean",
                           "states": states}},
    }  # fmt: skip


def _write_row(exp_dir: Path, index: int, name: str, vqa: list[float], l1: list[float],
               shard_dir: Path) -> None:  # fmt: skip
    run_dir = exp_dir / f"run{index}"
    docs_dir = run_dir / "eval_data" / "data" / "eval"
    docs_dir.mkdir(parents=True)
    (docs_dir / "shapes_vqa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in _docs()))
    pope = [{"id": f"q{i:03d}", "label": "yes" if i % 2 else "no"} for i in range(N)]
    (docs_dir / "shapes_pope.jsonl").write_text("".join(json.dumps(d) + "\n" for d in pope))
    pope_states = pope_confusion([d["label"] for d in pope], [d["label"] for d in pope])
    budget = {"name": "smoke", "max_steps": {"stage1": 4}, "eval_limit": N, "test_images": 8}
    config = {"stage": {"name": "study", "params": {"report": SPEC, "budget": budget}},
              "data": {"shard_dir": str(shard_dir)}}  # fmt: skip
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    results = {"schema": 1, "tasks": {"shapes_vqa": _task("vqa_accuracy", vqa, True),
                                      "shapes_edit": _task("l1", l1, False),
                                      "shapes_pope": _task("pope_f1", [1.0] * N, True)}}  # fmt: skip
    results["tasks"]["shapes_pope"]["items"]["pope_f1"].update(
        reducer="pope_f1", states=pope_states.tolist()
    )
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "results.json").write_text(json.dumps(results))
    rng = np.random.default_rng(index)
    Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(
        run_dir / "fixed_overlays.png"
    )
    row = {"tokens_mean": 6.5 - index, "tokens_min": 2, "tokens_max": 9,
           "tflops_tiny": 1e-4 * (index + 1), "train_seconds": 10.0,
           "seed_scores": rng.random(64).tolist(), "fixed_overlays": "fixed_overlays.png",
           "fixed_clusters": 10}  # fmt: skip
    (run_dir / "row.json").write_text(json.dumps(row))
    (run_dir / "job_status.json").write_text(json.dumps({"state": "COMPLETED"}))


@pytest.fixture
def exp_dir(tmp_path: Path) -> Path:
    exp = tmp_path / "runs" / "table_t"
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir(parents=True)
    card = {"splits": {"train": {"vqa_answers": {"color": {"red": 9, "blue": 1},
                                                 "position": {"no": 5, "yes": 4}}}}}  # fmt: skip
    (shard_dir / "dataset_card.json").write_text(json.dumps(card))
    rng = np.random.default_rng(0)
    noise = rng.random(N).tolist()
    rows = [
        ("base", [0.0] * N, noise),
        ("same", [0.0] * N, noise),  # identical scores: not significant
        ("better", [1.0] * N, [x + 1.0 for x in noise]),  # every answer right, L1 worse
    ]
    jobs = []
    for i, (name, vqa, l1) in enumerate(rows):
        _write_row(exp, i, name, vqa, l1, shard_dir)
        jobs.append({"index": i, "name": name, "job_id": f"j{i}",
                     "run_dir": str(exp / f"run{i}"), "overrides": [f"x={name}"]})  # fmt: skip
    older = {"jobs": [{"index": 0, "name": "stale", "job_id": "old", "run_dir": "gone"}]}
    record = {"launches": [older, {"jobs": jobs}]}
    (exp / "launch_record.json").write_text(json.dumps(record))
    return exp


def test_report_table_has_paired_tests_references_and_the_paper_column(exp_dir: Path) -> None:
    table = build_table(*collect_rows(exp_dir), n_resamples=50)
    rows = list(csv.DictReader(csv_text(table).splitlines()))
    cell = {(r["row"], r["column"]): r for r in rows}
    assert cell[("base", "VQA acc ↑")]["baseline"] == "True"
    assert cell[("same", "VQA acc ↑")]["p_value"] == "1.0"
    assert "n.s." in cell[("same", "VQA acc ↑")]["text"]
    better = cell[("better", "VQA acc ↑")]
    assert better["test"] == "mcnemar" and float(better["p_value"]) < 0.05
    assert "n.s." not in better["text"] and float(better["delta"]) == 1.0
    l1 = cell[("better", "edit L1 ↓")]
    assert l1["test"] == "paired_bootstrap" and float(l1["delta"]) == pytest.approx(1.0)
    # The position subset: every 4th question, so n = 10 of 40.
    assert cell[("better", "position acc ↑")]["n"] == "10"
    # Question-only answers from the train card: "red" for colour (right), "no" for position
    # (wrong): 30/40; a uniform guess: (1/2 per colour question, 1/2 per position question).
    assert float(cell[("blind (question only)", "VQA acc ↑")]["value"]) == pytest.approx(0.75)
    assert float(cell[("random answer", "VQA acc ↑")]["value"]) == pytest.approx(0.5)
    assert cell[("base", "VQA acc ↑")]["paper"] == "60.2"
    # Answering "yes" to every balanced POPE probe: F1 2/3, shown beside the rows.
    assert float(cell[("always yes", "POPE F1 ↑")]["value"]) == pytest.approx(2 / 3)
    assert float(cell[("base", "POPE F1 ↑")]["value"]) == pytest.approx(1.0)
    md = markdown(table)
    assert "**base (baseline)**" in md and "stale" not in md  # the newest launch only
    assert "6.5* (2–9)" in md and "4.5 (2–9)" in md  # dynamic rows starred, others not
    assert "| 25* |" in md and "`x=better`" in md  # the paper's figure, the row's overrides
    assert "DEBUG" not in md and "Traceback" not in md


@pytest.mark.slow  # plots (matplotlib)
def test_report_command_writes_every_file(
    exp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(exp_dir), "--resamples", "50"]) == 0
    assert "index.html" in capsys.readouterr().out
    out = exp_dir / "report"
    for name in (
        "table.md",
        "table.csv",
        "index.html",
        "scores_higher_is_better.png",
        "costs_lower_is_better.png",
        "seed_scores.png",
        "fixed_overlays.png",
    ):
        assert (out / name).stat().st_size > 0, name
    # Figure 7c: the rows' overlays stacked in one image, one labelled band per row.
    assert Image.open(out / "fixed_overlays.png").size[1] > 3 * 256
    md = (out / "table.md").read_text()
    assert "![Scores (higher is better)](scores_higher_is_better.png)" in md


def test_report_of_a_dir_without_launches_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "launch_record.json" in capsys.readouterr().err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_report_page_renders_in_headless_chromium(exp_dir: Path, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required in CI (.ci/apt/chromium.txt installs it)")
        pytest.skip("chromium not installed (apt-get install chromium, or run .ci/run)")
    page = write_report(exp_dir, n_resamples=50)["html"].resolve().as_uri()
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900",
            "--virtual-time-budget=5000"]  # fmt: skip
    dom = subprocess.run([*base, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    status = dom.stdout.split('id="render-status"', 1)[1].split(">", 1)[0]
    assert 'data-fits="yes"' in status, status  # the table fits a 1280 px wide window
    images = status.split('data-images="', 1)[1].split('"', 1)[0]
    loaded, total = (int(x) for x in images.split("/"))
    assert total == 4 and loaded == total, images
    shot = tmp_path / "shot.png"
    run = subprocess.run([*base, f"--screenshot={shot}", page], capture_output=True, timeout=120)
    assert run.returncode == 0 and shot.is_file()
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (900, 1280) and pixels.std() > 5  # something was drawn


# ---------------------------------------------------------------- end to end
@pytest.mark.slow
def test_components_array_at_smoke_budget_ends_with_its_report(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    args = ["+exp=ablation_components", "budget=smoke", f"run_root={root}",
            "--only", "full,wo_merger", "launcher.poll_s=1", "--wait"]  # fmt: skip
    assert main(args) == 0
    exp = root / "ablation_components"
    md = (exp / "report" / "table.md").read_text()
    assert "full (baseline)" in md and "wo_merger" in md and "blind (question only)" in md
    rows = list(csv.DictReader((exp / "report" / "table.csv").open()))
    vqa = {r["row"]: r for r in rows if r["column"] == "VQA acc ↑"}
    assert vqa["wo_merger"]["p_value"] != "" and vqa["full"]["value"] != ""
    records = sorted(exp.glob("*/stage*/pipeline_step.json"))
    assert len(records) == 6
    before = {p: p.stat().st_mtime_ns for p in records}
    # Relaunched after every row finished: nothing trains, the report is written again.
    report = exp / "report" / "report.json"
    stamp = json.loads(report.read_text())["time"]
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in records} == before
    assert json.loads(report.read_text())["time"] > stamp


def test_a_launch_without_the_baseline_row_has_no_differences(exp_dir: Path) -> None:
    record = json.loads((exp_dir / "launch_record.json").read_text())
    jobs = record["launches"][-1]["jobs"]
    record["launches"].append({"jobs": [j for j in jobs if j["name"] == "better"]})
    (exp_dir / "launch_record.json").write_text(json.dumps(record))  # e.g. --only better
    table = build_table(*collect_rows(exp_dir), n_resamples=50)
    assert [r.name for r in table.rows if not r.reference] == ["better"]
    assert any("'base' has no scores" in n for n in table.notes)
    assert all(c.p is None for line in table.cells for c in line)
