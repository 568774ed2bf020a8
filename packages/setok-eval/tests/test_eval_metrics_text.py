"""Text metrics against hand-worked cases and (CIDEr-D) against pycocoevalcap."""

from __future__ import annotations

import random

import numpy as np
import pytest

from setok_eval.metrics.cider import CiderD, cider_d, tokenize_caption
from setok_eval.metrics.mme import MMEItem, mme_scores, parse_mme_answer
from setok_eval.metrics.pope import parse_pope_answer, pope_metrics
from setok_eval.metrics.vqa import exact_match, normalize_vqa_answer, vqa_accuracy


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("none", "0"),
        ("A dog.", "dog"),
        ("3.5", "3.5"),
        ("3,000", "3000"),
        ("hello,world", "hello world"),
        ("hello, world", "hello world"),
        ("x-ray", "x ray"),
        ("dont", "don't"),
        ("Im here", "im here"),  # contractions apply after lowercasing: "im" is not a key
        ("  the\tcat\n", "cat"),
        ("yes!", "yes"),
    ],
)
def test_normalize_vqa_answer_follows_official_rules(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_vqa_accuracy_hand_worked():
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    # 2 of 10 humans said "2": leaving out a "2" leaves 1 match (1/3), leaving out a "3" leaves 2.
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx((2 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("a dog.", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0
    assert vqa_accuracy("blue", ["red"] * 10) == 0.0
    assert vqa_accuracy("dog", ["dog"] + ["cat"] * 9) == pytest.approx(0.1 * 0 + 0.9 * (1 / 3))


def test_vqa_ground_truth_normalised_only_when_answers_disagree():
    # Identical answers are compared raw, so "yes." never matches the normalised "yes".
    assert vqa_accuracy("yes.", ["yes."] * 10) == 0.0
    # Disagreeing answers get punctuation normalisation: "yes." becomes "yes".
    assert vqa_accuracy("yes", ["yes."] * 5 + ["no"] * 5) == 1.0


def test_vqa_accuracy_rejects_bad_answers():
    with pytest.raises(ValueError, match="answers"):
        vqa_accuracy("x", [])
    with pytest.raises(TypeError, match="answer"):
        normalize_vqa_answer(3)


def test_exact_match():
    assert exact_match("Left.", "left") == 1.0
    assert exact_match(" yes ", ["no", "Yes"]) == 1.0
    assert exact_match("left side", "left") == 0.0


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Yes, there is a cat.", 1),
        ("No.", 0),
        ("There is not a cat", 0),
        ("I see no cat", 0),
        ("yes. no", 1),  # only the first sentence counts
        ("Nope", 1),  # not the word "no": parsed as yes, as the POPE script does
        ("No,there is none", 1),  # comma removed first: "Nothere" is not "No"
    ],
)
def test_parse_pope_answer(text, label):
    assert parse_pope_answer(text) == label


def test_pope_metrics_hand_worked():
    preds = ["yes", "Yes it is", "no", "No.", "yes"]
    labels = ["yes", "no", "no", "yes", "yes"]
    m = pope_metrics(preds, labels)  # tp=2 fp=1 tn=1 fn=1
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match=r"labels\[1\]"):
        pope_metrics(["yes", "no"], ["yes", "maybe"])


def test_mme_scores_hand_worked():
    items = [
        MMEItem("count", "1", "Yes", "Yes"),
        MMEItem("count", "1", "No", "No"),
        MMEItem("count", "2", "No", "Yes"),
        MMEItem("count", "2", "no", "No"),
        MMEItem("color", "3", "yes it is", "Yes"),
        MMEItem("color", "3", "not sure", "No"),
    ]
    s = mme_scores(items)
    assert s["count/acc"] == pytest.approx(75.0)
    assert s["count/acc_plus"] == pytest.approx(50.0)
    assert s["count/score"] == pytest.approx(125.0)
    assert s["color/score"] == pytest.approx(200.0)
    assert s["total"] == pytest.approx(325.0)
    assert parse_mme_answer("maybe") == "other"


def _random_corpus(rng: random.Random, n: int):
    words = "a man dog cat on the red blue sits runs park street with ball".split()

    def sent(lo=0):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, 12)))

    refs = {i: [sent(1) for _ in range(rng.randint(1, 5))] for i in range(n)}
    preds = {i: sent() for i in range(n)}
    return preds, refs


def test_cider_d_matches_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider

    rng = random.Random(0)
    for n in (1, 2, 7, 40):
        preds, refs = _random_corpus(rng, n)
        ref_score, ref_per = Cider().compute_score(refs, {i: [preds[i]] for i in preds})
        score, per = cider_d(preds, refs)
        assert score == pytest.approx(ref_score, rel=1e-12, abs=1e-12)
        assert np.allclose([per[i] for i in range(n)], ref_per, rtol=1e-12, atol=1e-12)


def test_cider_resample_weights_equal_duplicated_corpus():
    from pycocoevalcap.cider.cider import Cider

    preds, refs = _random_corpus(random.Random(1), 6)
    weights = np.array([2, 0, 1, 3, 0, 1])
    dup_ids = [(i, k) for i in range(6) for k in range(weights[i])]
    ref_score, _ = Cider().compute_score(
        {j: refs[i] for j, (i, _) in enumerate(dup_ids)},
        {j: [preds[i]] for j, (i, _) in enumerate(dup_ids)},
    )
    scorer = CiderD([preds[i] for i in range(6)], [refs[i] for i in range(6)])
    assert scorer.score(weights) == pytest.approx(ref_score, rel=1e-12)


def test_cider_hand_worked_identical_caption_and_errors():
    # A hypothesis equal to its only reference, in a two-image corpus, against a disjoint one.
    score, per = cider_d(
        {"a": "red ball", "b": "blue cat"}, {"a": ["red ball"], "b": ["green dog"]}
    )
    assert per["a"] == pytest.approx(10.0 / 4 * 2)  # unigram and bigram cosines are 1; 3,4-grams 0
    assert per["b"] == 0.0
    assert score == pytest.approx(2.5)
    with pytest.raises(ValueError, match="missing predictions"):
        cider_d({"a": "x"}, {"a": ["x"], "b": ["y"]})


def test_tokenize_caption():
    assert tokenize_caption("A man, riding a horse.") == "a man riding a horse"
    assert tokenize_caption("It's (very) big!") == "it's very big"
