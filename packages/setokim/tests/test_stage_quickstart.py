"""The quickstart stage: a tiny SeTok trained with the mask-consistency KL on Shapes World."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from setokim.stages import build_stage
from setokim.train import TrainerConfig, train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qs") / "shapes"


def _stage(data_dir: Path, **kw: object):
    return build_stage(
        "quickstart", {"data": {"shard_dir": str(data_dir)}, "generate_train": 24, **kw}
    )


def test_generates_missing_dataset_and_resumes_batches(data_dir: Path) -> None:
    stage = _stage(data_dir)
    it = stage.batches(0, 1, 0, 4)
    first = [next(it) for _ in range(7)]  # 24 samples / 4 = 6 per epoch: crosses into epoch 1
    assert (data_dir / "manifest.json").is_file()
    assert first[0]["pixels"].shape == (4, 3, 64, 64)
    assert first[0]["object_masks"].dtype == torch.bool
    assert first[0]["object_valid"].any(1).all()
    resumed = next(stage.batches(0, 1, 5, 4))
    torch.testing.assert_close(resumed["pixels"], first[5]["pixels"], rtol=0, atol=0)
    resumed = next(stage.batches(0, 1, 6, 4))
    torch.testing.assert_close(resumed["pixels"], first[6]["pixels"], rtol=0, atol=0)
    assert not torch.equal(first[6]["pixels"], first[0]["pixels"])  # new epoch, new order
    r0 = next(stage.batches(0, 2, 0, 4))["pixels"]
    r1 = next(stage.batches(1, 2, 0, 4))["pixels"]
    assert not torch.equal(r0, r1)  # ranks read disjoint samples


def test_loss_trains_the_encoder_only(data_dir: Path) -> None:
    stage = _stage(data_dir)
    model = stage.build_model()
    batch = next(stage.batches(0, 1, 0, 4))
    loss, metrics = stage.loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    assert metrics["clusters"] >= 1 and metrics["objects"] >= 1
    loss.backward()
    enc = [p.grad for p in model.setok.encoder.parameters() if p.requires_grad]
    assert enc and all(g is not None for g in enc)
    assert sum(float(g.abs().sum()) for g in enc) > 0
    trainable = {id(p) for p in stage.trainable(model)}
    assert all(id(p) not in trainable for p in model.setok.merger.parameters())
    units = stage.fsdp_units(model)
    assert len(units) == 2  # the tiny ViT's two layers


def test_bad_configs_name_the_key(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="encoder.freeze"):
        _stage(data_dir, tokenizer={"encoder": {"freeze": True}})
    with pytest.raises(ValueError, match="patch"):
        _stage(data_dir, tokenizer={"clustering": {"mechanism": "patch"}})
    with pytest.raises(ValueError, match="lr_typo"):
        _stage(data_dir, lr_typo=1)
    with pytest.raises(ValueError, match="shard_dirr"):
        build_stage("quickstart", {"data": {"shard_dirr": "x"}})
    with pytest.raises(FileNotFoundError, match="generate_if_missing"):
        stage = _stage(data_dir.parent / "none", generate_if_missing=False)
        next(stage.batches(0, 1, 0, 4))


@pytest.mark.slow
def test_quickstart_loss_falls(tmp_path: Path) -> None:
    stage = build_stage(
        "quickstart", {"data": {"shard_dir": str(tmp_path / "data")}, "generate_train": 128}
    )
    cfg = TrainerConfig(
        max_steps=40, micro_batch_size=16, lr=3e-3, warmup_steps=5, log_every=5, progress=False
    )
    result = train(stage, cfg, tmp_path / "run")
    first, last = result.history[:8], result.history[-8:]
    assert sum(last) / 8 < 0.7 * sum(first) / 8, result.history
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"clusters", "objects"} <= records[-1].keys()


def test_resampler_attention_maps_are_trained(data_dir: Path) -> None:
    """Table 5's resampler row: the KL moves the learnable queries through attention maps."""
    stage = _stage(
        data_dir, tokenizer={"clustering": {"mechanism": "resampler", "max_clusters": 4}}
    )
    model = stage.build_model()
    batch = next(stage.batches(0, 1, 0, 4))
    loss, _ = stage.loss(model, batch)
    loss.backward()
    grad = model.setok.resampler.queries.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("assignment", ["hard", "soft"])
def test_threshold_row_trains_the_encoder(data_dir: Path, assignment: str) -> None:
    """Table 5's threshold row (DPC-KNN): its masks carry a gradient to the encoder."""
    clustering = {"mechanism": "threshold", "assignment": assignment, "max_clusters": 4}
    stage = _stage(data_dir, tokenizer={"clustering": clustering})
    model = stage.build_model()
    loss, _ = stage.loss(model, next(stage.batches(0, 1, 0, 4)))
    loss.backward()
    grads = [p.grad for p in model.setok.encoder.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
