"""TrainerConfig validation, Hydra structured-config round trip, LR schedule, stage registry."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from setokim.stages import available_stages, build_stage
from setokim.train import TrainerConfig, WandbConfig
from setokim.train.schedule import build_scheduler, warmup_cosine


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_steps", 0),
        ("micro_batch_size", 0),
        ("grad_accum", 0),
        ("lr", -1.0),
        ("betas", (0.9, 1.5)),
        ("min_lr_ratio", 2.0),
        ("keep_last", 0),
        ("mixed_precision", "fp16"),
        ("fsdp", "maybe"),
        ("max_nonfinite_in_row", 0),
    ],
)
def test_bad_value_names_the_key(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"TrainerConfig\.{key}"):
        TrainerConfig(**{key: value})


def test_wandb_mode_checked() -> None:
    with pytest.raises(ValueError, match="WandbConfig.mode"):
        WandbConfig(mode="sometimes")


def test_structured_config_round_trip() -> None:
    schema = OmegaConf.structured(TrainerConfig)
    merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(["lr=0.01", "betas=[0.8,0.9]"]))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, TrainerConfig)
    assert cfg.lr == 0.01 and cfg.betas == (0.8, 0.9)
    with pytest.raises(Exception, match="not_a_key"):
        OmegaConf.merge(schema, OmegaConf.from_dotlist(["not_a_key=1"]))
    bad = OmegaConf.merge(schema, OmegaConf.from_dotlist(["fsdp=sideways"]))
    with pytest.raises(ValueError, match="TrainerConfig.fsdp"):
        OmegaConf.to_object(bad)


def test_warmup_then_cosine_to_floor() -> None:
    kw = {"warmup_steps": 4, "max_steps": 20, "min_lr_ratio": 0.1}
    ramp = [warmup_cosine(s, **kw) for s in range(4)]
    assert ramp == sorted(ramp) and ramp[0] == pytest.approx(0.25) and ramp[-1] == 1.0
    decay = [warmup_cosine(s, **kw) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))
    assert decay[0] == pytest.approx(1.0) and decay[-1] == pytest.approx(0.1)
    mid = warmup_cosine(12, **kw)  # half-way through the cosine
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(100, **kw) == pytest.approx(0.1)


def test_scheduler_drives_optimizer_lr() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = build_scheduler(opt, warmup_steps=2, max_steps=4, min_lr_ratio=0.0)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1.0, 2.0, 2.0, 1.0])


def test_registry() -> None:
    assert {"toy", "quickstart"} <= set(available_stages())
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        build_stage("nope", {})
    with pytest.raises(ValueError, match="widht"):
        build_stage("toy", {"widht": 3})
    stage = build_stage("toy", {"hidden": 8, "depth": 2})
    assert len(stage.fsdp_units(stage.build_model())) == 2


def test_stage_params_build_typed_groups_over_the_stage_defaults() -> None:
    """A partial nested mapping keeps the stage's own defaults (not the class defaults)."""
    stage = build_stage("stage1", {"tokenizer": {"clustering": {"mechanism": "fixed"}},
                                   "data": {"shard_dir": "elsewhere"}})  # fmt: skip
    assert stage.cfg.tokenizer.clustering.mechanism == "fixed"
    assert stage.cfg.tokenizer.clustering.max_clusters == 8  # the tiny tokenizer's, not 32
    assert (stage.cfg.data.shard_dir, stage.cfg.data.task) == ("elsewhere", "image")
    with pytest.raises(ValueError, match=r"stage1\.tokenizer\.merger\.num_heads"):
        build_stage("stage1", {"tokenizer": {"merger": {"num_heads": 0}}})
    with pytest.raises(TypeError, match=r"pipeline\.steps\[0\].*'name'"):
        build_stage("pipeline", {"steps": [{"params": {}}]})


def test_toy_stream_layout_is_rank_and_accum_invariant() -> None:
    stage = build_stage("toy", {})
    one = next(iter(stage.batches(0, 1, 3, 8)))["x"]
    r0 = next(iter(stage.batches(0, 2, 3, 4)))["x"]
    r1 = next(iter(stage.batches(1, 2, 3, 4)))["x"]
    torch.testing.assert_close(torch.cat([r0, r1]), one, rtol=0, atol=0)
    it = iter(stage.batches(0, 1, 6, 4))
    torch.testing.assert_close(torch.cat([next(it)["x"], next(it)["x"]]), one, rtol=0, atol=0)
    assert not torch.equal(one, next(iter(stage.batches(0, 1, 4, 8)))["x"])


def test_toy_stream_crosses_chunk_boundaries() -> None:
    stage = build_stage("toy", {})
    whole = stage.samples(250, 12)["x"]
    parts = torch.cat([stage.samples(250, 6)["x"], stage.samples(256, 6)["x"]])
    torch.testing.assert_close(whole, parts, rtol=0, atol=0)
    assert whole.shape == (12, 16)
