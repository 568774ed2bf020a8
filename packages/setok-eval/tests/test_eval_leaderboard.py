"""Leaderboard: tables, deltas and tests vs baseline, data-version guard, CLI, Chromium render."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from setok_eval import run_eval
from setok_eval.io import atomic_write_json
from setok_eval.leaderboard import MixedDataError, build_leaderboard
from setok_eval.results import read_results
from setok_eval.toys import ToyAdapter, write_toy_suite

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lb")
    suite = write_toy_suite(root / "suite", n=24)
    dirs = {}
    for name, skill in (("base", 0.5), ("better", 1.0), ("worse", 0.25)):
        out = root / "runs" / name / "eval"
        run_eval(ToyAdapter(skill, name=name), suite, out, n_resamples=100, progress=False)
        dirs[name] = root / "runs" / name
    return dirs


def test_leaderboard_files_tables_and_best(runs, tmp_path):
    written = build_leaderboard(
        [runs["base"], runs["better"], runs["worse"]], runs["base"], tmp_path, n_resamples=200
    )
    md = written["md"].read_text()
    for family in ("vqa", "mllm_bench", "grounding", "segmentation", "tokenizer", "editing"):
        assert f"## {family}" in md
    vqa_section = md.split("## vqa")[1].split("## ")[0]
    row = next(line for line in vqa_section.splitlines() if line.startswith("| better"))
    assert "**1 [" in row  # the perfect run is best (bold) on vqa accuracy
    rows = list(csv.DictReader(written["csv"].open()))
    vqa = {r["run"]: r for r in rows if r["task"] == "toy_vqa"}
    assert vqa["base"]["is_baseline"] == "True" and vqa["base"]["delta"] == ""
    assert float(vqa["better"]["delta"]) > 0 and float(vqa["worse"]["delta"]) < 0
    assert vqa["better"]["is_best"] == "True" and vqa["worse"]["is_best"] == "False"
    # VQA scores here are 0/1 per item, so the paired test is McNemar; gIoU is continuous.
    assert vqa["better"]["test"] == "mcnemar" and float(vqa["better"]["p_value"]) < 0.05
    giou = {r["run"]: r for r in rows if r["task"] == "toy_mask" and r["metric"] == "giou"}
    assert giou["better"]["test"] == "paired_bootstrap"
    l1 = {r["run"]: r for r in rows if r["metric"] == "l1"}
    assert l1["better"]["is_best"] == "True"  # lower is better for L1
    assert (tmp_path / "forest.png").stat().st_size > 0
    assert (tmp_path / "tokens_per_image.png").stat().st_size > 0
    assert len(list((tmp_path / "overlays").glob("*/*.png"))) == 12


def test_leaderboard_refuses_mixed_data_versions(runs, tmp_path):
    other = tmp_path / "other" / "eval"
    shutil.copytree(runs["worse"] / "eval", other)
    res = read_results(other)
    res.pop("_path")
    res["tasks"]["toy_vqa"]["data_version"] = "sha256:different"
    atomic_write_json(other / "results.json", res)
    with pytest.raises(MixedDataError, match="toy_vqa"):
        build_leaderboard([runs["base"], other.parent], runs["base"], tmp_path / "lb")
    written = build_leaderboard(
        [runs["base"], other.parent],
        runs["base"],
        tmp_path / "lb",
        allow_mixed_data=True,
        n_resamples=50,
    )
    assert "different data versions" in written["md"].read_text()


@pytest.mark.slow
def test_leaderboard_cli(runs, tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "eval_suite" / "leaderboard.py"),
        str(runs["better"]),
        str(runs["worse"]),
        "--baseline",
        str(runs["base"]),
        "--out",
        str(tmp_path),
        "--resamples",
        "50",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "index.html").is_file() and "base" in (
        tmp_path / "leaderboard.md"
    ).read_text()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
def test_index_html_renders_in_headless_chromium(runs, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required in CI (see .ci/apt/eval.txt)")
        pytest.skip("chromium not installed")
    written = build_leaderboard(
        [runs["base"], runs["better"]], runs["base"], tmp_path / "lb", n_resamples=50
    )
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        written["html"].resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert "<table" in dom, proc.stderr[-2000:]
    assert len(re.findall(r"<table data-family=", dom)) == 6
    assert re.search(r"<b>1 \[", dom), "the best value should render in bold"
    status = re.search(r"images loaded: (\d+)/(\d+)", dom)
    assert status is not None, "the page script did not run"
    loaded, total = int(status.group(1)), int(status.group(2))
    assert total >= 4 and loaded == total  # forest plot, histogram, overlays
    assert 'data-loaded="0"' not in dom
