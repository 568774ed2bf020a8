"""Bad input raises ValueError naming the argument (and the batch index where it applies)."""

import pytest
import torch

from setok_tokenizer.clustering import check_features, density_peak_scores, semantic_clustering
from setok_tokenizer.mechanisms import (
    Resampler,
    cluster_features,
    patch_clustering,
    threshold_clustering,
)

X = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(0))
SCORE = density_peak_scores(X, 2).score


def nonfinite(value: float, batch: int) -> torch.Tensor:
    x = X.clone()
    x[batch, 4, 1] = value
    return x


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(x=X[0]), r"x must be a \(B, N, D\) tensor"),
        (dict(x=X.long()), "x must be a floating-point"),
        (dict(x=X[:, :0]), "x must have B, N, D >= 1"),
        (dict(valid=torch.ones(4, 5, dtype=torch.bool)), "valid must be a bool tensor"),
        (dict(valid=torch.ones(4, 6)), "valid must be a bool tensor"),
        (dict(valid=torch.tensor([[True] * 6, [False] * 6] * 2)), r"valid\[1\] has no valid"),
        (dict(knn_k=0), "knn_k must be an int >= 1"),
        (dict(knn_k=1.5), "knn_k must be an int >= 1"),
        (dict(x=nonfinite(float("nan"), 2)), "x has non-finite values at batch index 2"),
        (dict(x=nonfinite(float("inf"), 3)), "x has non-finite values at batch index 3"),
    ],
)
def test_density_peak_scores_errors(kwargs: dict, pattern: str) -> None:
    args = dict(x=X, knn_k=2, valid=None) | kwargs
    with pytest.raises(ValueError, match=pattern):
        density_peak_scores(args["x"], args["knn_k"], args["valid"])


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(max_clusters=1), "max_clusters must be an int >= 2"),
        (dict(score=SCORE[:, :5]), "score must have shape"),
        (
            dict(score=SCORE.masked_fill(torch.eye(4, 6, dtype=torch.bool), float("nan"))),
            "score has non-finite values at batch index 0",
        ),
        (dict(assignment="medium"), "assignment must be one of"),
        (dict(stop="never"), "stop must be one of"),
        (dict(min_scope=1.5), "min_scope must be in"),
        (dict(kernel_scale=-1.0), "kernel_scale must be"),
        (dict(d2=torch.zeros(4, 6, 5)), "d2 must have shape"),
        (dict(x=nonfinite(float("nan"), 1)), "x has non-finite values at batch index 1"),
        (dict(valid=torch.zeros(4, 6, dtype=torch.bool)), r"valid\[0\] has no valid token"),
    ],
)
def test_semantic_clustering_errors(kwargs: dict, pattern: str) -> None:
    args = dict(x=X, score=SCORE, max_clusters=3, kernel_scale=1.0) | kwargs
    x, score, k = args.pop("x"), args.pop("score"), args.pop("max_clusters")
    with pytest.raises(ValueError, match=pattern):
        semantic_clustering(x, score, k, **args)


def test_nan_in_padding_is_allowed_but_not_in_valid_tokens() -> None:
    x = nonfinite(float("nan"), 2)
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[2, 4] = False
    density_peak_scores(x, 2, valid)  # no error: the NaN is padding
    valid[2, 4] = True
    with pytest.raises(ValueError, match="batch index 2"):
        density_peak_scores(x, 2, valid)


def test_huge_finite_values_are_not_reported_as_non_finite() -> None:
    x = torch.full((1, 3, 4), 3e38)  # the per-token sum overflows; the values do not
    valid, has_padding = check_features(x, None)
    assert valid.all() and not has_padding


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(min_clusters=4, max_clusters=3), "min_clusters=4 must be <= max_clusters=3"),
        (dict(min_clusters=0), "min_clusters must be an int >= 1"),
        (dict(threshold=float("nan")), "threshold must be a finite number"),
        (dict(score=SCORE[:2]), "score must have shape"),
    ],
)
def test_threshold_clustering_errors(kwargs: dict, pattern: str) -> None:
    args = dict(score=SCORE, threshold=0.5, min_clusters=1, max_clusters=3) | kwargs
    with pytest.raises(ValueError, match=pattern):
        threshold_clustering(X, **args)


def test_mechanism_errors() -> None:
    with pytest.raises(ValueError, match="mechanism must be one of"):
        cluster_features(X, "kmeans")
    with pytest.raises(ValueError, match="Resampler module"):
        cluster_features(X, "resampler")
    with pytest.raises(ValueError, match="x must have feature size 8"):
        Resampler(8, 4)(X)
    with pytest.raises(ValueError, match="num_heads=3 must divide dim=8"):
        Resampler(8, 4, num_heads=3)
    with pytest.raises(ValueError, match=r"valid must be a \(B, N\) bool"):
        patch_clustering(torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"valid\[1\] has no valid token"):
        patch_clustering(torch.tensor([[True, False], [False, False]]))
