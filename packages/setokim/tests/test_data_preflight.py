"""The launch-time data check, the one-task expand plan and the export of converted data."""

from __future__ import annotations

import json

import pytest

from setokim.data.config import DataConfig
from setokim.data.converters import convert_vqav2
from setokim.data.converters.fake_vqav2 import write_fake_vqav2
from setokim.data.eval_export import export_eval_data, read_export
from setokim.data.loader import make_loader
from setokim.data.preflight import DataCheckError, StepData, check_step


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    fake = write_fake_vqav2(root / "raw", "val", 6)
    convert_vqav2(
        fake.images, root / "vqa", "train", questions_json=fake.questions,
        annotations_json=fake.annotations, coco_split="val", samples_per_shard=4,
    )  # fmt: skip
    return root / "vqa"


def _step(shards, task="vqa", micro=4, masks=False, **data):
    return StepData("stage2", DataConfig(shard_dir=str(shards), task=task, **data), micro, masks)


def test_a_mix_the_shards_cannot_feed_names_step_task_and_holdings(vqa):
    step = _step(vqa, "mix", mix_weights={"caption": 1.0, "t2i": 1.0})
    with pytest.raises(DataCheckError) as err:
        check_step(step)
    msg = str(err.value)
    assert "step 'stage2'" in msg and "['caption', 't2i']" in msg
    assert "holds 6 samples; per task (samples): {'vqa': 6}" in msg
    notes = check_step(_step(vqa, "mix", mix_weights={"caption": 1.0, "vqa": 1.0}))
    assert notes and "['caption'] are in no sample" in notes[0]


def test_full_batch_counts_items_with_expand_and_ranks(vqa):
    assert check_step(_step(vqa, micro=6)) == []
    with pytest.raises(DataCheckError, match="6 samples have it"):
        check_step(_step(vqa, micro=4), world_size=2)
    assert check_step(_step(vqa, micro=4, expand=True), world_size=2) == []  # 18 questions


def test_masks_missing_dir_and_generation(vqa, tmp_path):
    with pytest.raises(DataCheckError, match="sub-phase 2 trains the mask decoder.* split 'train'"):
        check_step(_step(vqa, "image", masks=True))
    assert check_step(_step(vqa, "image", masks=True, allow_missing_masks=True)) == []
    with pytest.raises(DataCheckError, match="does not exist.*data.generate=true"):
        check_step(_step(tmp_path / "typo"))
    assert "generated there" in check_step(_step(tmp_path / "typo"), generate=True)[0]


def test_expand_one_task_is_every_question_once_in_full_batches(vqa):
    loader = make_loader(vqa, "train", "vqa", 4, expand=True, shuffle=False)
    batches = list(loader)
    assert loader.full_batches == len(batches) == 18 // 4
    assert all(len(b["questions"]) == 4 for b in batches)
    keys = [k for b in batches for k in b["key"]]
    assert len(set(keys)) == len(keys) == 16  # items keyed sample#j, none twice
    resumed = list(make_loader(vqa, "train", "vqa", 4, expand=True, shuffle=False, start_batch=2))
    assert [b["key"] for b in resumed] == [b["key"] for b in batches[2:]]


def test_converted_jpeg_split_exports_as_a_suite_task(vqa, tmp_path, capsys):
    paths = export_eval_data(vqa, "train", tmp_path, names={"vqa": "vqav2_val", "edit": "x"})
    assert list(paths) == ["vqav2_val"]  # no edits in VQAv2: skipped with a message
    assert "x: skipped" in capsys.readouterr().out
    docs = [json.loads(line) for line in paths["vqav2_val"].read_text().splitlines()]
    assert len(docs) == 18 and docs[0]["image"].endswith(".jpg") and len(docs[0]["answers"]) == 10
    assert (tmp_path / "data" / "eval" / docs[0]["image"]).is_file()
    assert read_export(tmp_path)["data_version"].startswith("vqav2:")
