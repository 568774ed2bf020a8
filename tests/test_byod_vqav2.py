"""Bring your own data, the whole path a user takes, with no file written by hand.

Tiny fake data in the official VQAv2 layout (JPEG images, question and annotation JSON) ->
tools/data/vqav2.py -> tools/check_shards.py -> Stages I, II and III through the launcher
(+exp=setokim_shapes on the converted folder) -> tools/export_eval_data.py (the test split
as the suite's vqav2_val documents) -> +exp=eval for the Stage II and Stage III exports ->
eval_suite/leaderboard.py. The README's "Data, evaluation, tools" section shows these
commands. Also: the launch-time data check refuses the recipe unchanged on this data.
"""

from __future__ import annotations

import json

import pytest

from setok_experiments.cli import main as launch
from setokim.data.converters.fake_vqav2 import write_fake_vqav2

# Stage I sub-phase 1 only (VQAv2 has no object masks to name objects by, sub-phase 0, or to
# train the mask decoder on, sub-phase 2), and the Stage II / III mixes get
# the data's one task: what the launch-time check asks for (see the first launch below).
PIPELINE = [
    "stage.params.steps.0.params.subphase=1",
    "stage.params.steps.0.params.subphase1_batches=0",
    "stage.params.steps.0.params.subphase0_batches=0",
    "stage.params.steps.0.params.attribute_weight=0",
    "stage.params.steps.0.params.token_attribute_weight=0",
    "+stage.params.steps.1.params.data.mix_weights.vqa=1.0",
    "stage.params.steps.2.params.data.mix_weights.vqa=2.0",
    "stage.params.steps.0.trainer.max_steps=2",
    "stage.params.steps.1.trainer.max_steps=2",
    "stage.params.steps.2.trainer.max_steps=2",
    "trainer.micro_batch_size=4",
]


@pytest.mark.slow
def test_convert_check_train_export_eval_leaderboard(tmp_path, capsys, script):
    raw, shards, runs = tmp_path / "raw", tmp_path / "vqav2", tmp_path / "runs"
    vqav2 = script("tools/data/vqav2.py").main
    for split, n in (("train", 16), ("val", 4)):  # both splits' image ids start at 1
        fake = write_fake_vqav2(raw, split, n)
        argv = ["--images", str(fake.images), "--out", str(shards), "--split",
                "train" if split == "train" else "test", "--questions-json", str(fake.questions),
                "--annotations-json", str(fake.annotations), "--coco-split", split]  # fmt: skip
        assert vqav2(argv) == 0
    assert script("tools/check_shards.py").main([str(shards), "--no-progress"]) == 0
    card = json.loads((shards / "dataset_card.json").read_text())
    assert card["blind_baseline"]["test"]["yes/no"]["n"] == 4

    base = ["+exp=setokim_shapes", f"run_root={runs}", f"data.shard_dir={shards}"]
    capsys.readouterr()
    assert launch([*base, "--dry-run"]) == 2  # the recipe unchanged: refused before training
    err = capsys.readouterr().err
    assert "step 'stage1'" in err and "object masks" in err and "split 'train'" in err
    assert launch([*base, *PIPELINE]) == 0
    (run,) = {p.parent.parent for p in (runs / "setokim_shapes").glob("*/stage3/export")}
    exports = {s: run / s / "export" for s in ("stage2", "stage3")}
    assert all((p / "setokim_config.json").is_file() for p in exports.values())

    data_root = tmp_path / "eval_data"
    export = script("tools/export_eval_data.py").main
    argv = [str(shards), "--split", "test", "--out", str(data_root), "--task", "vqa=vqav2_val"]
    assert export([*argv, "--no-progress"]) == 0
    docs = (data_root / "data" / "eval" / "vqav2_val.jsonl").read_text().splitlines()
    assert len(docs) == 12 and json.loads(docs[0])["image"].endswith(".jpg")

    for path in exports.values():
        argv = ["+exp=eval", f"run_root={runs}", "tasks=[vqav2_val]", f"checkpoint={path}",
                f"eval_data={data_root}", "stage.params.n_resamples=50"]  # fmt: skip
        assert launch(argv) == 0
    results = [
        json.loads(p.read_text()) for p in sorted((runs / "eval").glob("*/eval/results.json"))
    ]
    assert len(results) == 2 and all(r["tasks"]["vqav2_val"]["n"] == 12 for r in results)
    assert all(r["tasks"]["vqav2_val"]["data_version"].startswith("vqav2:") for r in results)

    board = tmp_path / "leaderboard"
    run_dirs = sorted(str(p.parent) for p in (runs / "eval").glob("*/eval/results.json"))
    argv = [*run_dirs, "--baseline", run_dirs[0], "--out", str(board), "--resamples", "50"]
    assert script("eval_suite/leaderboard.py").main(argv) == 0
    assert "vqav2_val" in next(board.glob("*.md")).read_text()
