"""Properties of the clustering that must hold for any batch (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from setok_tokenizer.clustering import density_peak_scores, semantic_clustering
from setok_tokenizer.mechanisms import threshold_clustering

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def batches(draw: st.DrawFn) -> dict:
    """Grouped features (a few centres + noise) with a random valid mask and parameters."""
    b = draw(st.integers(1, 3))
    n = draw(st.integers(2, 14))
    d = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 3, d, generator=g) * draw(st.sampled_from([0.5, 1.0, 2.0]))
    which = torch.randint(0, 3, (b, n), generator=g)
    x = centres.gather(1, which[..., None].expand(-1, -1, d))
    x = x + 0.2 * torch.randn(b, n, d, generator=g)
    valid = torch.rand(b, n, generator=g) > draw(st.sampled_from([0.0, 0.3, 0.6]))
    valid[torch.arange(b), torch.randint(0, n, (b,), generator=g)] = True
    return {
        "x": x,
        "valid": valid,
        "knn_k": draw(st.integers(1, 4)),
        "max_clusters": draw(st.integers(2, 7)),
        "min_scope": draw(st.sampled_from([0.0, 0.05, 0.3])),
        "assignment": draw(st.sampled_from(["soft", "hard"])),
        "stop": draw(st.sampled_from(["dynamic", "fixed"])),
        "seed": seed,
    }


def run(case: dict, x: torch.Tensor | None = None, valid: torch.Tensor | None = None):
    x = case["x"] if x is None else x
    valid = case["valid"] if valid is None else valid
    scores = density_peak_scores(x, case["knn_k"], valid)
    out = semantic_clustering(
        x,
        scores,
        case["max_clusters"],
        valid=valid,
        min_scope=case["min_scope"],
        assignment=case["assignment"],
        stop=case["stop"],
    )
    return scores, out


@SETTINGS
@given(batches())
def test_masks_partition_valid_tokens(case: dict) -> None:
    _, out = run(case)
    valid = case["valid"]
    k = case["max_clusters"]
    totals = out.masks.sum(dim=1)
    assert_close(totals[valid], torch.ones(int(valid.sum())), rtol=0, atol=1e-5)
    assert torch.equal(totals[~valid], torch.zeros(int((~valid).sum())))
    assert out.masks.shape == (valid.shape[0], k, valid.shape[1])
    assert ((out.num_clusters >= 1) & (out.num_clusters <= k)).all()
    slots = torch.arange(k)[None, :] < out.num_clusters[:, None]
    assert torch.equal(out.cluster_valid, slots)
    assert torch.equal(out.masks[~slots], torch.zeros(int((~slots).sum()), valid.shape[1]))
    assert (out.seeds[~slots] == -1).all()
    seeded = out.seeds >= 0
    assert valid.gather(1, out.seeds.clamp(min=0))[seeded].all()
    if case["assignment"] == "hard":
        assert set(out.masks.unique().tolist()) <= {0.0, 1.0}
        assert (out.masks[slots].sum(-1) > 0).all()  # no empty cluster survives
    elif case["stop"] == "fixed":
        assert (out.num_clusters == k).all()


@SETTINGS
@given(batches())
def test_batched_equals_per_image(case: dict) -> None:
    scores, out = run(case)
    for i in range(case["x"].shape[0]):
        s1, o1 = run(case, case["x"][i : i + 1], case["valid"][i : i + 1])
        assert torch.equal(s1.score, scores.score[i : i + 1])
        assert torch.equal(o1.seeds, out.seeds[i : i + 1])
        assert torch.equal(o1.num_clusters, out.num_clusters[i : i + 1])
        assert torch.equal(o1.masks, out.masks[i : i + 1])


@SETTINGS
@given(batches(), st.integers(1, 5))
def test_padding_tokens_change_nothing(case: dict, extra: int) -> None:
    scores, out = run(case)
    b, n, d = case["x"].shape
    junk = torch.randn(b, extra, d, generator=torch.Generator().manual_seed(case["seed"])) * 9
    x = torch.cat([case["x"], junk], dim=1)
    valid = torch.cat([case["valid"], torch.zeros(b, extra, dtype=torch.bool)], dim=1)
    scores2, out2 = run(case, x, valid)
    assert_close(scores2.score[:, :n], scores.score, rtol=1e-4, atol=1e-5)
    assert torch.equal(scores2.score[:, n:], torch.zeros(b, extra))
    assert torch.equal(out2.seeds, out.seeds)
    assert torch.equal(out2.num_clusters, out.num_clusters)
    assert_close(out2.masks[:, :, :n], out.masks, rtol=1e-4, atol=1e-5)
    assert torch.equal(out2.masks[:, :, n:], torch.zeros(b, case["max_clusters"], extra))


@SETTINGS
@given(batches())
def test_permuting_tokens_permutes_scores(case: dict) -> None:
    x, valid, k = case["x"], case["valid"], case["knn_k"]
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(case["seed"]))
    s = density_peak_scores(x, k, valid)
    p = density_peak_scores(x[:, perm], k, valid[:, perm])
    for name in ("rho", "delta", "score"):
        assert_close(getattr(p, name), getattr(s, name)[:, perm], rtol=1e-4, atol=1e-5)


@SETTINGS
@given(batches())
def test_gradients_reach_features(case: dict) -> None:
    x = case["x"].clone().requires_grad_(True)
    scores = density_peak_scores(x, case["knn_k"], case["valid"])
    out = semantic_clustering(
        x, scores, case["max_clusters"], valid=case["valid"], kernel_scale=0.5
    )
    weights = torch.randn(out.masks.shape, generator=torch.Generator().manual_seed(1))
    (out.masks * weights).sum().backward()
    assert torch.isfinite(x.grad).all()
    # gradient is zero only if every valid image has a single valid token (masks constant)
    if (case["valid"].sum(1) > 1).any():
        assert x.grad[case["valid"]].abs().sum() > 0
    assert torch.equal(x.grad[~case["valid"]], torch.zeros(int((~case["valid"]).sum()), x.shape[2]))


@SETTINGS
@given(batches(), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.integers(1, 3))
def test_lower_threshold_never_fewer_clusters(
    case: dict, t1: float, t2: float, min_clusters: int
) -> None:
    low, high = min(t1, t2), max(t1, t2)
    score = density_peak_scores(case["x"], case["knn_k"], case["valid"]).score
    k = max(case["max_clusters"], min_clusters)
    common = dict(min_clusters=min_clusters, max_clusters=k, valid=case["valid"])
    a = threshold_clustering(case["x"], score, threshold=low, **common)
    b = threshold_clustering(case["x"], score, threshold=high, **common)
    assert (a.num_clusters >= b.num_clusters).all()
    n_valid = case["valid"].sum(1)
    assert (a.num_clusters <= torch.clamp(n_valid, max=k)).all()
    assert (b.num_clusters >= torch.clamp(n_valid, max=min_clusters)).all()
