"""The controls of `setok_eval.controls` on stub models whose dependence on the image is known:
a question-only answerer must score the same with shifted images, an answerer that reads the
colour off the image must lose; the blind baseline equals a hand-computed majority."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from setok_eval import run_eval
from setok_eval.controls import (
    ShiftedImageAdapter,
    blind_scores,
    derangement,
    grouped_scores,
    majority_answers,
    shifted_image_map,
)
from setok_eval.documents import load_documents
from setok_eval.registry import parse_task
from setok_eval.results import item_states

COLOURS = {
    "red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
    "yellow": (230, 220, 20), "white": (250, 250, 250), "black": (5, 5, 5),
}  # fmt: skip


def _colour_suite(root: Path, n: int = 6):
    """n single-colour scenes (all colours distinct for n <= 6) with a colour and a count question each."""
    (root / "img").mkdir(parents=True)
    names = list(COLOURS)
    docs = []
    for i in range(n):
        colour = names[i % len(names)]
        Image.fromarray(np.full((8, 8, 3), COLOURS[colour], dtype=np.uint8)).save(
            root / "img" / f"{i}.png"
        )
        docs.append({"id": f"c{i:02d}", "image": f"img/{i}.png", "question": "What colour is it?",
                     "question_type": "colour", "answers": [colour] * 10})  # fmt: skip
        docs.append({"id": f"n{i:02d}", "image": f"img/{i}.png", "question": "How many shapes?",
                     "question_type": "count", "answers": ["1"] * 10})  # fmt: skip
    path = root / "vqa.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return parse_task({
        "name": "colour_vqa", "version": 1, "family": "vqa", "output": "text",
        "method": "understand", "data": {"path": str(path)}, "prompt": "{question}",
        "metrics": ["vqa_accuracy"], "primary": "vqa_accuracy",
    })  # fmt: skip


class QuestionOnly:
    """Answers from the prompt text alone (never opens the image): a blind model."""

    def fingerprint(self) -> str:
        return "question-only"

    def understand(self, reqs):
        return ["1" if "many" in r.prompt else "red" for r in reqs]


class ColourReader:
    """Reads the colour name nearest to the image's mean pixel: a model that sees."""

    def fingerprint(self) -> str:
        return "colour-reader"

    def understand(self, reqs):
        out = []
        for r in reqs:
            if "many" in r.prompt:
                out.append("1")
                continue
            mean = r.load_image().reshape(-1, 3).mean(0)
            out.append(min(COLOURS, key=lambda c: float(((mean - COLOURS[c]) ** 2).sum())))
        return out


def _scores(adapter, task, out: Path) -> dict[str, float]:
    results = run_eval(adapter, [task], out, n_resamples=0, progress=False)
    ids, states, _ = item_states(results["tasks"][task.name], "vqa_accuracy")
    return dict(zip(ids, states[:, 0].tolist(), strict=True))


def _mapping(task) -> dict[str, str]:
    docs, _ = load_documents(task)
    return shifted_image_map([d["image"] for d in docs], seed=3)


def test_question_only_model_scores_the_same_with_shifted_images(tmp_path):
    task = _colour_suite(tmp_path / "data")
    own = _scores(QuestionOnly(), task, tmp_path / "own")
    shifted = _scores(ShiftedImageAdapter(QuestionOnly(), _mapping(task)), task, tmp_path / "sh")
    assert own == shifted
    assert 0 < sum(own.values()) < len(own)  # right on counts and red scenes only


def test_image_reader_loses_with_shifted_images(tmp_path):
    task = _colour_suite(tmp_path / "data")
    docs, _ = load_documents(task)
    own = grouped_scores(_scores(ColourReader(), task, tmp_path / "own"), docs, n_resamples=200)
    adapter = ShiftedImageAdapter(ColourReader(), _mapping(task))
    shifted = grouped_scores(_scores(adapter, task, tmp_path / "sh"), docs, n_resamples=200)
    assert own["colour"]["value"] == 1.0 and own["count"]["value"] == 1.0
    # another scene's image has another colour: every colour answer is now wrong
    assert shifted["colour"]["value"] == 0.0 and shifted["count"]["value"] == 1.0
    assert own["all"]["n"] == 12 and shifted["all"]["value"] == 0.5
    lo, hi = shifted["all"]["ci95"]
    assert lo < 0.5 < hi


def test_shifted_adapter_changes_fingerprint_and_refuses_unknown_images(tmp_path):
    task = _colour_suite(tmp_path / "data", n=2)
    mapping = _mapping(task)
    adapter = ShiftedImageAdapter(ColourReader(), mapping)
    assert adapter.fingerprint() != ColourReader().fingerprint()
    assert not hasattr(adapter, "segment")  # only what the wrapped model has
    with pytest.raises(ValueError, match="to themselves"):
        ShiftedImageAdapter(ColourReader(), {"a.png": "a.png"})
    partial = ShiftedImageAdapter(ColourReader(), dict(list(mapping.items())[:1]))
    with pytest.raises(KeyError, match="not in the shifted-image map"):
        run_eval(partial, [task], tmp_path / "out", n_resamples=0, progress=False)


def test_derangement_never_maps_an_item_to_itself():
    for n in range(2, 12):
        for seed in range(30):
            perm = derangement(n, seed)
            assert sorted(perm.tolist()) == list(range(n))
            assert not (perm == np.arange(n)).any()
    assert (derangement(9, 5) == derangement(9, 5)).all()
    assert any((derangement(9, 5) != derangement(9, s)).any() for s in range(6, 10))
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1)


def test_shifted_image_map_pairs_every_image_with_another():
    paths = ["b.png", "a.png", "c.png", "a.png", "b.png"]
    mapping = shifted_image_map(paths, seed=0)
    assert sorted(mapping) == ["a.png", "b.png", "c.png"]
    assert sorted(mapping.values()) == ["a.png", "b.png", "c.png"]
    assert all(k != v for k, v in mapping.items())
    with pytest.raises(ValueError, match="at least 2 distinct images"):
        shifted_image_map(["a.png", "a.png"])


def test_blind_baseline_equals_hand_computed_majority():
    card_answers = {  # a tiny hand-written card: train answer counts per question type
        "colour": {"blue": 1, "red": 3, "green": 2},
        "count": {"2": 2, "1": 2},  # a tie: alphabetically first, "1"
        "exist": {"yes": 5, "no": 4},
    }
    majority = majority_answers(card_answers)
    assert majority == {"colour": "red", "count": "1", "exist": "yes"}
    docs = [
        {"id": "a", "question_type": "colour", "answers": ["red"] * 10},
        {"id": "b", "question_type": "colour", "answers": ["blue"] * 10},
        {"id": "c", "question_type": "count", "answers": ["1"] * 10},
        {"id": "d", "question_type": "count", "answers": ["2"] * 8 + ["1"] * 2},
        {"id": "e", "question_type": "exist", "answers": ["no"] * 10},
    ]
    scores = blind_scores(docs, majority)
    # VQA accuracy: two "1"s among ten answers earns (8 * 2/3 + 2 * 1/3) / 10 = 0.6
    assert scores == pytest.approx({"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.6, "e": 0.0})
    summary = grouped_scores(scores, docs, n_resamples=0)
    assert summary["all"]["value"] == pytest.approx(2.6 / 5)
    assert summary["colour"] == {"value": 0.5, "n": 2, "ci95": None}
    assert summary["count"]["value"] == pytest.approx(0.8)
    with pytest.raises(KeyError, match="'shape' has no train majority"):
        blind_scores([{"id": "x", "question_type": "shape", "answers": ["star"]}], majority)
    with pytest.raises(KeyError, match="no score for document 'z'"):
        grouped_scores(scores, [{"id": "z", "question_type": "colour"}])
