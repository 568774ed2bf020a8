"""Epoch-based schedules: TrainerConfig.epochs / warmup_ratio -> max_steps / warmup_steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from setokim.stages import build_stage
from setokim.train import TrainerConfig, train
from setokim.train.config import resolve_schedule
from setokim.train.loop import resolve_stage_schedule


@pytest.mark.parametrize(
    ("batches", "accum", "epochs", "expected"),
    [
        (32, 1, 1.0, 32),  # 1024 samples, 1 rank x 32
        (8, 1, 1.0, 8),  # 1024 samples, 4 ranks x 32
        (8, 2, 1.0, 4),  # the same with grad_accum 2
        (7, 1, 1.0, 7),  # 1000 samples, 4 ranks x 32: 250 per rank, 7 full micro-batches
        (7, 2, 1.0, 3),  # 7 micro-batches -> 3 full steps of 2
        (7, 2, 2.0, 7),  # 2 epochs: 14 micro-batches, 7 steps (floor after the product)
        (32, 1, 2.5, 80),  # fractional epochs
        (2447, 1, 1.0, 2447),  # paper Stage II scale: (558K + 695K) / 16 GPUs / 32
    ],
)
def test_epochs_derive_max_steps(batches: int, accum: int, epochs: float, expected: int) -> None:
    cfg = TrainerConfig(max_steps=5, micro_batch_size=32, grad_accum=accum, epochs=epochs)
    for world in (1, 4, 16):  # epoch_batches is per rank: the world size does not scale it
        out = resolve_schedule(cfg, batches, world)
        assert out.max_steps == expected == math.floor(epochs * batches / accum)
        assert out.warmup_steps == cfg.warmup_steps  # no ratio: warmup as configured
    assert cfg.max_steps == 5  # the input is not modified


@pytest.mark.parametrize(
    ("max_steps", "ratio", "expected"),
    [(100, 0.1, 10), (2447, 0.1, 245), (7, 0.1, 1), (10, 0.0, 0), (3, 0.5, 2)],
)
def test_warmup_ratio_derives_warmup_steps(max_steps: int, ratio: float, expected: int) -> None:
    cfg = TrainerConfig(max_steps=max_steps, warmup_steps=50, warmup_ratio=ratio)
    out = resolve_schedule(cfg, None, 1)  # no epochs: no sample count needed
    assert out.max_steps == max_steps
    assert out.warmup_steps == expected == math.ceil(ratio * max_steps - 1e-9)


def test_warmup_ratio_applies_to_the_derived_max_steps() -> None:
    cfg = TrainerConfig(micro_batch_size=8, epochs=1, warmup_ratio=0.1)
    out = resolve_schedule(cfg, 95, 1)
    assert (out.max_steps, out.warmup_steps) == (95, 10)


def test_without_epochs_or_ratio_the_config_is_unchanged() -> None:
    cfg = TrainerConfig(max_steps=17, warmup_steps=3)
    assert resolve_schedule(cfg, 10_000, 8) is cfg


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epochs", 0),
        ("epochs", -1.0),
        ("epochs", float("inf")),
        ("warmup_ratio", 1.0),
        ("warmup_ratio", -0.1),
    ],
)
def test_bad_values_name_the_field(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"TrainerConfig\.{key}"):
        TrainerConfig(**{key: value})


def test_bad_values_fail_through_the_structured_schema() -> None:
    schema = OmegaConf.structured(TrainerConfig)
    ok = OmegaConf.to_object(OmegaConf.merge(schema, {"epochs": 1, "warmup_ratio": 0.1}))
    assert isinstance(ok, TrainerConfig) and ok.epochs == 1.0 and ok.warmup_ratio == 0.1
    with pytest.raises(ValueError, match=r"TrainerConfig\.warmup_ratio"):
        OmegaConf.to_object(OmegaConf.merge(schema, {"warmup_ratio": 1.5}))


def test_too_little_data_names_epochs() -> None:
    cfg = TrainerConfig(micro_batch_size=32, grad_accum=2, epochs=1)
    with pytest.raises(ValueError, match=r"TrainerConfig\.epochs.*256 samples.*world_size 4"):
        resolve_schedule(cfg, 1, 4)  # one micro-batch per rank: not one step of 2 x 32
    with pytest.raises(ValueError, match=r"TrainerConfig\.epochs.*no finite epoch"):
        resolve_schedule(cfg, None, 1)
    with pytest.raises(ValueError, match="world_size"):
        resolve_schedule(cfg, 2, 0)
    with pytest.raises(ValueError, match="epoch_batches"):
        resolve_schedule(cfg, -1, 1)


def test_stage_without_an_epoch_rejects_epochs() -> None:
    toy = build_stage("toy", {})  # an endless synthetic stream
    with pytest.raises(ValueError, match=r"TrainerConfig\.epochs"):
        resolve_stage_schedule(toy, TrainerConfig(epochs=1), 0, 1)
    out, info = resolve_stage_schedule(toy, TrainerConfig(max_steps=20, warmup_ratio=0.1), 0, 1)
    assert (out.max_steps, out.warmup_steps) == (20, 2)
    assert info is not None and info["epoch_batches"] is None and info["epoch_samples"] is None


def test_one_epoch_run_stops_at_the_derived_step(tmp_path: Path) -> None:
    """A real (tiny, CPU) quickstart run: 24 samples, 4 x 2 per step -> 3 steps, 1 warmup."""
    stage = build_stage(
        "quickstart", {"data": {"shard_dir": str(tmp_path / "data")}, "generate_train": 24}
    )
    assert stage.epoch_batches(0, 1, 4) == 6  # generated on first use, then planned
    assert stage.epoch_batches(1, 2, 4) == 3  # 12 per rank
    data = {"shard_dir": str(tmp_path / "data")}
    for name in ("stage2", "stage3"):  # task mixes: each sample draws one item, 8 per rank
        mllm = build_stage(name, {"data": data})
        assert [mllm.epoch_batches(r, 3, 1) for r in range(3)] == [8, 8, 8], name
    cfg = TrainerConfig(
        max_steps=1000, warmup_steps=50, micro_batch_size=4, grad_accum=2, epochs=1,
        warmup_ratio=0.1, log_every=1, progress=False, mixed_precision="fp32",
    )  # fmt: skip
    result = train(stage, cfg, tmp_path / "run")
    assert result.step == 3 and len(result.history) == 3
    meta = json.loads((tmp_path / "run" / "trainer.json").read_text())
    assert meta["trainer"]["max_steps"] == 3 and meta["trainer"]["warmup_steps"] == 1
    assert meta["schedule"]["epoch_batches"] == 6 and meta["schedule"]["epoch_samples"] == 24
    assert meta["schedule"]["global_batch"] == 8
    state = json.loads(
        next((tmp_path / "run" / "checkpoints").glob("step_*/trainer_state.json")).read_text()
    )
    assert state["data_position"] == 6  # exactly one epoch of 4-sample micro-batches
    lrs = [
        json.loads(line)["lr"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"lr"' in line
    ]
    assert lrs[0] == pytest.approx(cfg.lr)  # warmup of one step is over after step 1
    assert lrs[-1] < lrs[0]  # then cosine
