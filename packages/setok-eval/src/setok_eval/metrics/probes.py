"""Linear probes: is an attribute linearly readable from a representation?

Used to ask whether SeTok's tokens carry their objects (colour, shape): fit a multinomial
logistic regression on the vectors of training objects, report accuracy on held-out objects,
beside the chance level (the most frequent training label).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax


@dataclass
class ProbeResult:
    """accuracy on the test vectors; chance = accuracy of always the most frequent train label."""

    accuracy: float
    chance: float
    n_train: int
    n_test: int


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    l2: float = 1e-2,
    max_iter: int = 500,
) -> ProbeResult:
    """Multinomial logistic regression (L-BFGS, L2 penalty) on standardised features.

    train_x (n, d) / test_x (m, d) float; train_y / test_y int labels (any values; a test
    label never seen in training counts as wrong). Standardisation uses train statistics.
    """
    train_x = np.asarray(train_x, dtype=np.float64)
    test_x = np.asarray(test_x, dtype=np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train_x and test_x must be (n, d) with the same d, got {train_x.shape} and "
            f"{test_x.shape}"
        )
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("each x must have one label per row")
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("linear_probe needs at least one train and one test vector")
    classes, y = np.unique(train_y, return_inverse=True)
    counts = np.bincount(y)
    chance = float(np.mean(test_y == classes[counts.argmax()]))
    if len(classes) == 1:
        return ProbeResult(chance, chance, len(train_x), len(test_x))
    mean, std = train_x.mean(0), train_x.std(0) + 1e-8
    a, b = (train_x - mean) / std, (test_x - mean) / std
    n, d = a.shape
    c = len(classes)
    onehot = np.eye(c)[y]

    def loss_and_grad(w_flat: np.ndarray) -> tuple[float, np.ndarray]:
        w = w_flat.reshape(d + 1, c)
        logp = log_softmax(a @ w[:-1] + w[-1], axis=1)
        loss = -(onehot * logp).sum() / n + 0.5 * l2 * (w[:-1] ** 2).sum()
        diff = (np.exp(logp) - onehot) / n
        grad = np.vstack([a.T @ diff + l2 * w[:-1], diff.sum(0, keepdims=True)])
        return float(loss), grad.ravel()

    fit = minimize(
        loss_and_grad, np.zeros((d + 1) * c), jac=True, method="L-BFGS-B",
        options={"maxiter": max_iter},
    )  # fmt: skip
    w = fit.x.reshape(d + 1, c)
    predicted = classes[(b @ w[:-1] + w[-1]).argmax(1)]
    return ProbeResult(float(np.mean(predicted == test_y)), chance, len(train_x), len(test_x))
