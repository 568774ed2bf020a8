"""Bootstrap intervals, paired tests, and task-file validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from setok_eval.registry import METRICS, TaskValidationError, load_task, load_tasks, parse_task
from setok_eval.scoring import SCORERS
from setok_eval.stats import bootstrap_ci, mcnemar_exact, paired_compare, states_ci

SUITE = Path(__file__).resolve().parents[3] / "eval_suite" / "tasks"


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 2, 50).astype(float)
    large = rng.integers(0, 2, 2000).astype(float)
    lo, hi = states_ci(small, "mean", n_resamples=500)
    assert lo <= small.mean() <= hi
    lo2, hi2 = states_ci(large, "mean", n_resamples=500)
    assert (hi2 - lo2) < (hi - lo)
    # Roughly the normal-approximation width for a proportion.
    p = large.mean()
    assert hi2 - lo2 == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / len(large)), rel=0.15)
    with pytest.raises(ValueError, match="n must be"):
        bootstrap_ci(lambda idx: 0.0, 0)


def test_corpus_reducer_is_recomputed_per_resample():
    # Confusion rows (tp, fp, tn, fn): the F1 interval must come from recomputed F1, not a mean.
    rows = np.array([[1, 0, 0, 0]] * 30 + [[0, 1, 0, 0]] * 10 + [[0, 0, 0, 1]] * 10, dtype=float)
    lo, hi = states_ci(rows, "pope_f1", n_resamples=300)
    f1 = 2 * 30 / (2 * 30 + 10 + 10)
    assert lo < f1 < hi and 0.5 < lo and hi <= 1.0


def test_mcnemar_exact_matches_binomial():
    a = np.array([1] * 10 + [0] * 2 + [1] * 5 + [0] * 5)
    b = np.array([0] * 10 + [1] * 2 + [1] * 5 + [0] * 5)
    assert mcnemar_exact(a, b) == pytest.approx(sps.binomtest(10, 12, 0.5).pvalue)
    assert mcnemar_exact(a, a) == 1.0


def test_paired_compare_picks_the_test():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 300).astype(float)
    b = np.where(rng.random(300) < 0.3, 1.0, a)  # b fixes some of a's errors
    res = paired_compare(a, b, "mean", n_resamples=300)
    assert res.method == "mcnemar" and res.delta > 0 and res.p_value < 0.01
    assert res.ci95[0] <= res.delta <= res.ci95[1]
    x = rng.random(200)
    res2 = paired_compare(x, x + 0.001 * rng.standard_normal(200), "mean", n_resamples=300)
    assert res2.method == "paired_bootstrap" and res2.p_value > 0.01
    res3 = paired_compare(x, x + 0.2, "mean", n_resamples=300)
    assert res3.p_value < 0.01 and res3.delta == pytest.approx(0.2)
    with pytest.raises(ValueError, match="paired"):
        paired_compare(x, x[:5], "mean")


def test_suite_tasks_load_and_validate():
    tasks = load_tasks(SUITE)
    names = {t.name for t in tasks}
    assert {"vqav2_val", "pope", "mme", "refcoco_val", "reasonseg_val", "coco_tokens"} <= names
    for t in tasks:
        assert t.primary in [m.name for m in t.metrics]
    with pytest.raises(KeyError, match="unknown task"):
        load_tasks(SUITE, ["no_such_task"])


BASE = {
    "name": "t",
    "version": 1,
    "family": "vqa",
    "output": "text",
    "data": {"path": "x.jsonl"},
    "prompt": "{question}",
    "metrics": ["vqa_accuracy"],
    "primary": "vqa_accuracy",
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"output": "audio"}, "'output'"),
        ({"metrics": ["bleu"]}, "unknown metric 'bleu'"),
        ({"metrics": ["rec_accuracy"], "primary": "rec_accuracy"}, "scores"),
        ({"primary": "cider_d"}, "'primary'"),
        ({"prompt": "{0}"}, "placeholders"),
        ({"extra": 1}, "unknown key"),
        ({"data": {"path": "x", "sha": 1}}, "in 'data'"),
        ({"name": None}, "missing required key 'name'"),
    ],
)
def test_task_validation_errors(change, message):
    raw = {**BASE, **change}
    with pytest.raises(TaskValidationError, match=message):
        parse_task(raw, source="bad.yaml")


def test_load_task_names_the_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("name: [unclosed\n")
    with pytest.raises(TaskValidationError, match="broken.yaml"):
        load_task(f)
    spec = parse_task(BASE)
    assert spec.method == "understand" and spec.higher_is_better is True


def test_scorer_table_matches_the_metric_catalogue_and_the_suite():
    """Every metric a task may name has a scoring function, and every scoring function is
    used by some task of the suite (no scorer without a task)."""
    assert set(SCORERS) == set(METRICS), (
        f"metrics without a scorer: {sorted(set(METRICS) - set(SCORERS))}; "
        f"scorers outside the catalogue: {sorted(set(SCORERS) - set(METRICS))}"
    )
    tasks = load_tasks(SUITE)
    used = {m.metric for t in tasks for m in t.metrics}
    assert set(SCORERS) <= used, f"scorers no suite task uses: {sorted(set(SCORERS) - used)}"
    for task in tasks:
        assert all(m.metric in SCORERS for m in task.metrics), task.name
