"""The runner: end-to-end scoring, resume, sharding, a kill mid-run, and the replay adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from setok_eval import ReplayAdapter, read_results, resolve_rank, run_eval
from setok_eval.cache import PredictionCache
from setok_eval.toys import ToyAdapter, write_toy_suite


def _lines(folder: Path) -> list[dict]:
    out = []
    for f in sorted(folder.glob("rank*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def test_run_eval_scores_every_task_and_writes_results(tmp_path, toy_suite):
    good = run_eval(
        ToyAdapter(1.0),
        toy_suite,
        tmp_path / "good",
        n_resamples=50,
        progress=False,
        git_sha="abc",
        config_hash="cfg",
    )
    half = run_eval(
        ToyAdapter(0.5, name="half"), toy_suite, tmp_path / "half", n_resamples=50, progress=False
    )
    t = good["tasks"]
    assert t["toy_vqa"]["metrics"]["vqa_accuracy"]["value"] == 1.0
    assert t["toy_pope"]["metrics"]["pope_f1"]["value"] == 1.0
    assert t["toy_box"]["metrics"]["rec_accuracy"]["value"] == 1.0
    assert t["toy_mask"]["metrics"]["giou"]["value"] == 1.0
    assert t["toy_edit"]["metrics"]["l1"]["value"] == pytest.approx(0.0)  # prediction == target
    assert t["toy_tokens"]["metrics"]["tokens_per_image"]["value"] == 3.0
    for name in t:
        primary = t[name]["primary"]
        better = t[name]["higher_is_better"]
        g, h = (
            t[name]["metrics"][primary]["value"],
            half["tasks"][name]["metrics"][primary]["value"],
        )
        assert (g > h) if better else (g < h), name
    on_disk = read_results(tmp_path / "good")
    assert on_disk["git_sha"] == "abc" and on_disk["config_hash"] == "cfg"
    assert on_disk["tasks"]["toy_vqa"]["n"] == 12
    lo, hi = on_disk["tasks"]["toy_pope"]["metrics"]["pope_f1"]["ci95"]
    assert lo <= 1.0 <= hi
    assert on_disk["tasks"]["toy_vqa"]["data_version"].startswith("sha256:")
    assert len(list((tmp_path / "good" / "overlays" / "toy_tokens").glob("*.png"))) == 4


def test_resume_skips_cached_predictions(tmp_path, toy_suite):
    first = ToyAdapter(1.0)
    run_eval(first, toy_suite[:2], tmp_path, n_resamples=0, progress=False)
    assert first.calls == 24
    again = ToyAdapter(1.0)
    res = run_eval(again, toy_suite[:2], tmp_path, n_resamples=0, progress=False)
    assert again.calls == 0 and res["tasks"]["toy_vqa"]["n"] == 12
    other = ToyAdapter(0.5, name="other")  # another model fingerprint: nothing is reused
    run_eval(other, toy_suite[:1], tmp_path, n_resamples=0, progress=False)
    assert other.calls == 12


def test_shards_merge_into_one_scoring(tmp_path, toy_suite):
    vqa = toy_suite[:1]
    assert run_eval(ToyAdapter(1.0), vqa, tmp_path, rank=1, world_size=2, progress=False) is None
    res = run_eval(
        ToyAdapter(1.0), vqa, tmp_path, rank=0, world_size=2, n_resamples=0, progress=False
    )
    folder = tmp_path / "predictions" / "toy_vqa"
    assert len(_lines(folder)) == 12
    assert {f.name for f in folder.glob("*.jsonl")} == {"rank00000.jsonl", "rank00001.jsonl"}
    assert res["tasks"]["toy_vqa"]["n"] == 12 and res["world_size"] == 2


def test_rank_zero_times_out_on_missing_shard(tmp_path, toy_suite):
    with pytest.raises(TimeoutError, match="missing"):
        run_eval(
            ToyAdapter(1.0),
            toy_suite[:1],
            tmp_path,
            rank=0,
            world_size=2,
            wait_timeout_s=0.2,
            progress=False,
        )


@pytest.mark.slow
def test_kill_mid_run_then_resume_loses_and_duplicates_nothing(tmp_path):
    specs = write_toy_suite(tmp_path / "suite", n=40)
    vqa_file = specs[0].data_path
    out = tmp_path / "out"
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(f"""
        from setok_eval.toys import ToyAdapter
        from setok_eval.registry import parse_task
        from setok_eval import run_eval
        spec = parse_task({{"name": "toy_vqa", "version": 1, "family": "vqa", "output": "text",
                            "data": {{"path": {vqa_file!r}}}, "prompt": "{{question}}",
                            "metrics": ["vqa_accuracy"], "primary": "vqa_accuracy"}})
        run_eval(ToyAdapter(1.0, delay=0.05), [spec], {str(out)!r}, batch_size=1, progress=False)
    """)
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], env={**os.environ, "RANK": "0", "WORLD_SIZE": "1"}
    )
    cache_file = out / "predictions" / "toy_vqa" / "rank00000.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if cache_file.exists() and cache_file.read_text().count("\n") >= 5:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done = cache_file.read_text().count("\n")
    assert 5 <= done < 40, "the job should have been killed mid-run"
    with open(cache_file, "a") as handle:  # a line torn by the kill
        handle.write('{"key": "abc", "task": "toy_va')
    resumed = ToyAdapter(1.0)
    res = run_eval(resumed, [specs[0]], out, n_resamples=0, progress=False)
    assert resumed.calls == 40 - done
    lines = _lines(out / "predictions" / "toy_vqa")
    assert len(lines) == 40 and len({r["key"] for r in lines}) == 40
    assert res["tasks"]["toy_vqa"]["n"] == 40
    assert res["tasks"]["toy_vqa"]["metrics"]["vqa_accuracy"]["value"] == 1.0


def test_cache_ignores_and_repairs_torn_tail(tmp_path):
    cache = PredictionCache(tmp_path, rank=0)
    cache.append({"key": "a", "prediction": 1})
    with open(cache.path, "a") as handle:
        handle.write('{"key": "b", "predic')
    assert set(cache.load()) == {"a"} and cache.torn_lines == 1
    assert cache.repair() > 0
    cache.append({"key": "c", "prediction": 3})
    assert set(cache.load()) == {"a", "c"} and cache.torn_lines == 0


def test_resolve_rank_from_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_rank() == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    assert resolve_rank() == (1, 3)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank() == (2, 4)
    assert resolve_rank(0, 1) == (0, 1)
    with pytest.raises(ValueError, match="rank"):
        resolve_rank(3, 2)


def test_replay_adapter_scores_saved_predictions(tmp_path, toy_suite):
    vqa, pope = toy_suite[0], toy_suite[1]
    docs = [json.loads(line) for line in Path(vqa.data_path).read_text().splitlines()]
    pdocs = [json.loads(line) for line in Path(pope.data_path).read_text().splitlines()]
    preds = tmp_path / "preds.jsonl"
    with open(preds, "w") as handle:
        for i, d in enumerate(docs):
            answer = d["answers"][0] if i < 6 else "wrong"
            handle.write(
                json.dumps({"task": "toy_vqa", "id": d["id"], "prediction": answer}) + "\n"
            )
        for d in pdocs:
            handle.write(
                json.dumps({"task": "toy_pope", "id": d["id"], "prediction": "Yes"}) + "\n"
            )
    res = run_eval(
        ReplayAdapter(preds), [vqa, pope], tmp_path / "out", n_resamples=0, progress=False
    )
    assert res["tasks"]["toy_vqa"]["metrics"]["vqa_accuracy"]["value"] == pytest.approx(0.5)
    assert res["tasks"]["toy_pope"]["metrics"]["pope_accuracy"]["value"] == 0.5  # always "Yes"
    assert res["model"]["fingerprint"].startswith("replay:")
    with pytest.raises(KeyError, match="toy_box"):
        run_eval(ReplayAdapter(preds), [toy_suite[2]], tmp_path / "out2", progress=False)


def test_adapter_without_method_is_a_clear_error(tmp_path, toy_suite):
    class TextOnly:
        def fingerprint(self):
            return "t"

        def understand(self, reqs):
            return ["x"] * len(reqs)

    with pytest.raises(AttributeError, match="'ground'.*toy_box"):
        run_eval(TextOnly(), [toy_suite[2]], tmp_path, progress=False)
    assert np.isfinite(
        run_eval(TextOnly(), [toy_suite[0]], tmp_path, n_resamples=0, progress=False)["tasks"][
            "toy_vqa"
        ]["metrics"]["vqa_accuracy"]["value"]
    )


def test_run_cli_with_replay_adapter(tmp_path, toy_suite, capsys, script):
    cli = script("eval_suite/run.py")
    vqa = toy_suite[0]
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "toy_vqa.yaml").write_text(
        "name: toy_vqa\nversion: 1\nfamily: vqa\noutput: text\n"
        f"data: {{path: {Path(vqa.data_path).name}}}\nprompt: '{{question}}'\n"
        "metrics: [vqa_accuracy]\nprimary: vqa_accuracy\n"
    )
    docs = [json.loads(line) for line in Path(vqa.data_path).read_text().splitlines()]
    preds = tmp_path / "preds.jsonl"
    preds.write_text(
        "".join(
            json.dumps({"task": "toy_vqa", "id": d["id"], "prediction": d["answers"][0]}) + "\n"
            for d in docs
        )
    )
    rc = cli.main(
        [
            "--adapter",
            f"replay:{preds}",
            "--tasks-dir",
            str(tasks_dir),
            "--run-dir",
            str(tmp_path / "run"),
            "--data-root",
            str(Path(vqa.data_path).parent),
            "--resamples",
            "20",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "toy_vqa: vqa_accuracy = 1.0000" in capsys.readouterr().out
    assert read_results(tmp_path / "run")["tasks"]["toy_vqa"]["n"] == 12
