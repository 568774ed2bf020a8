"""linear_probe finds a planted attribute and stays at chance without one."""

from __future__ import annotations

import numpy as np
import pytest

from setok_eval.metrics.probes import linear_probe


def planted(n: int, d: int, classes: int, signal: float, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, d))
    directions = rng.normal(size=(classes, d))
    return x + signal * directions[y], y


def test_finds_a_planted_attribute() -> None:
    x, y = planted(400, 16, 6, signal=1.5, seed=0)
    result = linear_probe(x[:300], y[:300], x[300:], y[300:])
    assert result.accuracy > 0.9 and result.chance < 0.3
    assert (result.n_train, result.n_test) == (300, 100)


def test_random_features_stay_near_chance() -> None:
    x, y = planted(600, 16, 6, signal=0.0, seed=1)
    result = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert result.accuracy < 0.35


def test_unseen_test_label_counts_as_wrong_and_bad_shapes_are_named() -> None:
    x, y = planted(100, 4, 2, signal=3.0, seed=2)
    result = linear_probe(x[:80], y[:80], x[80:], np.full(20, 7))
    assert result.accuracy == 0.0
    with pytest.raises(ValueError, match="same d"):
        linear_probe(x[:80], y[:80], x[80:, :3], y[80:])
    with pytest.raises(ValueError, match="one label per row"):
        linear_probe(x[:80], y[:70], x[80:], y[80:])
