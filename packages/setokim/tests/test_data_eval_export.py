"""Shapes World -> eval-suite export: the documents load in setok_eval and score end to end.

An oracle adapter answering from the ground truth must score perfectly; a constant adapter
must not. Both go through the real registry, runner and metrics, so a format mismatch on
either side (field names, box convention, mask encoding, paths) fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from setok_eval import run_eval
from setok_eval.documents import load_documents, load_image, load_label_map
from setok_eval.metrics.image import ProjectionExtractor
from setokim.data.eval_export import (
    EVAL_TASKS,
    export_eval_data,
    export_version,
    iter_split,
    label_map,
    shapes_tasks,
    task_name,
)
from setokim.data.generate import generate_dataset
from setokim.data.rle import decode_mask
from setokim.data.schema import SampleAnnotation
from setokim.data.shards import dataset_version

REPO = Path(__file__).resolve().parents[3]
TASKS_DIR = REPO / "eval_suite" / "tasks"
NAMES = [task_name(t) for t in EVAL_TASKS]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_eval")
    shards = root / "sw"
    generate_dataset(shards, train=0, val=0, test=20, samples_per_shard=8)
    paths = export_eval_data(shards, "test", root / "data_root")
    return shards, root / "data_root", paths


class OracleAdapter:
    """Answers every request from the document's ground truth."""

    def fingerprint(self) -> str:
        return "oracle"

    def understand(self, reqs):
        field = {"shapes_caption": None, "shapes_vqa": "answer", "shapes_pope": "label"}
        return [
            r.doc["references"][0] if field[r.task] is None else r.doc[field[r.task]] for r in reqs
        ]

    def ground(self, reqs):
        return [r.doc["box"] for r in reqs]

    def segment(self, reqs):
        return [load_label_map(r.doc["mask"]) > 0 for r in reqs]

    def generate(self, reqs):
        return [load_image(r.doc["target"]) for r in reqs]

    def edit(self, reqs):
        return self.generate(reqs)

    def tokenize(self, reqs):
        return [load_label_map(r.doc["masks"]) for r in reqs]


class ConstantAdapter:
    """Ignores the input: one answer, one box, one mask, one image, one token."""

    def fingerprint(self) -> str:
        return "constant"

    def understand(self, reqs):
        return ["yes" for _ in reqs]

    def ground(self, reqs):
        return [[0.0, 0.0, 16.0, 16.0] for _ in reqs]

    def segment(self, reqs):
        return [np.ones((r.doc["height"], r.doc["width"]), dtype=bool) for r in reqs]

    def generate(self, reqs):
        return [np.full((64, 64, 3), 128, dtype=np.uint8) for _ in reqs]

    def edit(self, reqs):
        return self.generate(reqs)

    def tokenize(self, reqs):
        return [np.zeros((8, 8), dtype=np.int64) for _ in reqs]


def _run(adapter, exported, out: Path) -> dict:
    _, data_root, _ = exported
    return run_eval(
        adapter,
        shapes_tasks(TASKS_DIR, data_root),
        out,
        data_root=data_root,
        extractors={"inception": ProjectionExtractor.random(size=8, dim=8, seed=0)},
        n_resamples=20,
        git_sha="test",
        progress=False,
    )


def _value(results: dict, task: str, metric: str) -> float:
    return results["tasks"][task]["metrics"][metric]["value"]


def test_every_task_loads_with_its_data_version(exported):
    shards, data_root, paths = exported
    assert sorted(paths) == sorted(NAMES)
    version = export_version(dataset_version(shards), "test", None)
    for task in shapes_tasks(TASKS_DIR, data_root):
        docs, data_version = load_documents(task, data_root)
        assert data_version == version
        assert docs and all(d["split"] == "test" for d in docs)
        for doc in docs:
            for key in ("image", "target", "mask", "masks"):
                if key in doc:
                    assert Path(doc[key]).is_file(), (task.name, doc["id"], key)


def test_masks_and_boxes_match_the_shard_annotation(exported):
    shards, data_root, _ = exported
    task = shapes_tasks(TASKS_DIR, data_root, ["shapes_rec"])[0]
    docs, _ = load_documents(task, data_root)
    tokens_task = shapes_tasks(TASKS_DIR, data_root, ["shapes_tokens"])[0]
    token_docs = {d["key"]: d for d in load_documents(tokens_task, data_root)[0]}
    anns = {k: SampleAnnotation.from_json(f["json"]) for k, f in iter_split(shards, "test")}
    assert len(anns) == 20
    for doc in docs:
        obj = anns[doc["key"]].objects[doc["object_index"]]
        mask = load_label_map(doc["mask"]) > 0
        np.testing.assert_array_equal(mask, decode_mask(obj.mask))
        assert doc["box"] == obj.bbox
    for key, ann in anns.items():
        labels = load_label_map(token_docs[key]["masks"])
        np.testing.assert_array_equal(labels, label_map(ann))
        visible = [z + 1 for z, o in enumerate(ann.objects) if decode_mask(o.mask).any()]
        assert sorted(set(np.unique(labels)) - {0}) == visible


# a constant generator has zero feature covariance: FID's sqrtm warns, the value is still finite
@pytest.mark.slow  # over 5 s
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_oracle_scores_perfectly_and_constant_does_not(exported, tmp_path):
    shards, _, _ = exported
    good = _run(OracleAdapter(), exported, tmp_path / "oracle")
    bad = _run(ConstantAdapter(), exported, tmp_path / "constant")
    version = export_version(dataset_version(shards), "test", None)
    saved = json.loads((tmp_path / "oracle" / "results.json").read_text())
    assert {saved["tasks"][n]["data_version"] for n in NAMES} == {version}

    for task, metric in [
        ("shapes_vqa", "vqa_accuracy"),
        ("shapes_rec", "rec_accuracy"),
        ("shapes_reasonseg", "giou"),
        ("shapes_reasonseg", "ciou"),
        ("shapes_pope", "pope_f1"),
        ("shapes_tokens", "fg_ari"),
        ("shapes_tokens", "mbo"),
    ]:
        assert _value(good, task, metric) == pytest.approx(1.0), (task, metric)
        assert _value(bad, task, metric) < 0.9, (task, metric)
    assert _value(good, "shapes_edit", "l1") == 0.0 < _value(bad, "shapes_edit", "l1")
    assert _value(good, "shapes_t2i", "l1") == 0.0 < _value(bad, "shapes_t2i", "l1")
    assert _value(good, "shapes_t2i", "fid") < _value(bad, "shapes_t2i", "fid")
    # the rendered scene's main colour is one its caption names; a constant image's is not
    assert _value(good, "shapes_t2i", "colour_match") == 1.0
    assert _value(bad, "shapes_t2i", "colour_match") < 0.9
    assert _value(good, "shapes_caption", "cider_d") > _value(bad, "shapes_caption", "cider_d")
    # POPE probes are exactly half "yes": always answering yes gives accuracy 0.5
    assert _value(bad, "shapes_pope", "pope_accuracy") == pytest.approx(0.5)
    assert _value(bad, "shapes_tokens", "tokens_per_image") == 1.0
    assert _value(good, "shapes_tokens", "tokens_per_image") > 1.0


def test_limit_and_bad_arguments(exported, tmp_path):
    shards, _, _ = exported
    paths = export_eval_data(shards, "test", tmp_path, limit=3)
    keys = {json.loads(line)["key"] for line in paths["shapes_tokens"].read_text().splitlines()}
    assert len(keys) == 3
    meta = json.loads((tmp_path / "data" / "eval" / "shapes_export.json").read_text())
    assert meta["data_version"].endswith(":first3") and meta["images"] == 3
    with pytest.raises(ValueError, match="split 'nope'"):
        export_eval_data(shards, "nope", tmp_path)
    with pytest.raises(ValueError, match="limit"):
        export_eval_data(shards, "test", tmp_path, limit=0)
    with pytest.raises(FileNotFoundError, match="data_root"):
        shapes_tasks(TASKS_DIR, tmp_path / "empty")


def test_cli(exported, tmp_path, capsys, script):
    shards, _, _ = exported
    cli = script("tools/export_eval_data.py")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    capsys.readouterr()
    argv = [str(shards), "--split", "test", "--out", str(tmp_path), "--limit", "2", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "shapes_caption: 2 documents" in out
    assert (tmp_path / "data" / "eval" / "shapes_vqa.jsonl").is_file()


def test_t2i_colour_classes_are_shapes_worlds_colours() -> None:
    """The palette the shapes_t2i task names its colours with is the generator's own."""
    from setok_eval.registry import load_task
    from setokim.data.shapes_world import BACKGROUNDS, COLORS

    task = load_task(TASKS_DIR / "shapes_t2i.yaml")
    args = task.metric("colour_match").args
    assert {k: tuple(v) for k, v in args["colours"].items()} == COLORS
    assert {k: tuple(v) for k, v in args["background"].items()} == BACKGROUNDS
