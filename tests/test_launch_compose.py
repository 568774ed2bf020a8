"""Every experiment composes into typed configs that build their objects (no training), and a
bad value fails at compose time naming its key, before anything is planned or queued."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from setok_decoders.config import DecodersConfig
from setok_experiments.cli import main
from setok_experiments.compose import ConfigError, compose_experiment, validate
from setok_tokenizer import SeTok, SeTokConfig
from setokim.data.config import DataConfig
from setokim.model.config import SeTokIMConfig
from setokim.stages import build_stage
from setokim.train.config import TrainerConfig

REPO = Path(__file__).resolve().parents[1]

EXPERIMENTS = sorted(
    p.stem for p in (REPO / "experiments/conf/exp").glob("*.yaml") if not p.stem.startswith("_")
)


def _required(exp: str, tmp_path: Path) -> list[str]:
    """The values an experiment leaves to the command line (`???`): previous stages' exports."""
    if exp == "eval":
        return ["stage.params.tiny_random=true"]
    if exp.startswith("setokim_vicuna") and exp.endswith("stage2"):
        (tmp_path / "stage1" / "tokenizer").mkdir(parents=True)
        return [f"stage.params.steps.0.params.init_tokenizer={tmp_path / 'stage1'}"]
    if exp.startswith("setokim_vicuna") and exp.endswith("stage3"):
        (tmp_path / "stage2").mkdir()
        config = asdict(SeTokIMConfig())
        (tmp_path / "stage2" / "setokim_config.json").write_text(json.dumps(config))
        return [f"stage.params.steps.0.params.init_from={tmp_path / 'stage2'}"]
    return []


def _typed_parts(stage: Any) -> dict[str, Any]:
    """The typed configs a built objective holds (a pipeline: those of each step)."""
    cfg = getattr(stage, "cfg", None)
    parts = {name: getattr(cfg, name) for name in ("tokenizer", "data") if hasattr(cfg, name)}
    if hasattr(stage, "model_cfg"):
        parts["model"] = stage.model_cfg
    if hasattr(cfg, "decoder"):
        parts["decoder"] = cfg.decoder
    for index, (name, params, _trainer) in enumerate(getattr(stage, "steps", ())):
        for key, value in _typed_parts(build_stage(name, params)).items():
            parts[f"steps.{index}.{key}"] = value
    return parts


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_composes_and_builds_its_objects(exp: str, tmp_path: Path) -> None:
    composed = compose_experiment(exp, _required(exp, tmp_path))
    cfg = validate(composed)
    assert isinstance(cfg.tokenizer, SeTokConfig)
    assert isinstance(cfg.data, DataConfig) and isinstance(cfg.trainer, TrainerConfig)
    stage = build_stage(cfg.stage.name, OmegaConf.to_container(composed.stage.params, resolve=True))
    expected = {"tokenizer": SeTokConfig, "data": DataConfig, "model": SeTokIMConfig,
                "decoder": DecodersConfig}  # fmt: skip
    parts = _typed_parts(stage)
    for key, value in parts.items():
        assert isinstance(value, expected[key.rsplit(".", 1)[-1]]), (exp, key, value)
    if cfg.stage.name in ("quickstart", "stage1", "stage2", "stage3"):  # the stage's own groups
        assert {"tokenizer", "data"} <= set(parts), (exp, sorted(parts))
    if cfg.tokenizer.encoder.pretrained_path is None:  # a tiny tokenizer: build the module
        assert SeTok(cfg.tokenizer).output_dim > 0


@pytest.mark.parametrize(
    ("exp", "override", "key"),
    [
        ("quickstart", "tokenizer.clustering.mechanism=dynmic", "tokenizer.clustering.mechanism"),
        ("quickstart", "tokenizer.clustering.max_clusters=1", "tokenizer.clustering.max_clusters"),
        ("quickstart", "tokenizer.encoder.layer=middle", "tokenizer.encoder.layer"),
        ("quickstart", "tokenizer.merger.num_heads=0", "tokenizer.merger.num_heads"),
        ("quickstart", "trainer.lr=-1", "trainer.lr"),
        ("quickstart", "data.batch_size=0", "data.batch_size"),
        ("quickstart", "launcher.kind=pbs", "launcher.kind"),
        ("stage1_shapes", "decoder.diffusion.sampler=bogus", "sampler"),
        ("stage1_shapes", "decoder.mask.mask_scale=3", "mask_scale"),
        ("setokim_shapes", "mllm.llm.dtype=float64", "dtype"),
        ("setokim_shapes", "mllm.lora.dropout=1.5", "dropout"),
        # decoder and mllm are typed: a misspelt key or a wrong type fails naming it, also where
        # no stage reads the group
        ("stage1_shapes", "decoder.mask.hidden_dimm=3", "decoder.mask.hidden_dimm"),
        (
            "quickstart",
            "decoder.diffusion.mapper.num_querys=4",
            "decoder.diffusion.mapper.num_querys",
        ),
        ("setokim_shapes", "mllm.lora.rnak=4", "mllm.lora.rnak"),
        ("quickstart", "mllm.llm.hiden_size=8", "mllm.llm.hiden_size"),
        ("stage1_shapes", "decoder.mask.num_layers=two", "decoder.mask.num_layers"),
        ("setokim_shapes", "mllm.lora.rank=four", "mllm.lora.rank"),
        # stage params are typed per stage: bad values and unknown keys name their key
        ("setokim_shapes", "stage.params.steps.1.trainer.max_steps=-1", "trainer.max_steps"),
        ("setokim_shapes", "+stage.params.steps.2.params.lora.ranq=4", "ranq"),
        ("setokim_shapes", "stage.params.steps.0.params.subphase=3", "stage1.subphase"),
        ("stage1_shapes", "+stage.params.kl_weigth=1", "kl_weigth"),
        ("stage1_shapes", "stage.params.mask_weight=-1", "stage1.mask_weight"),
        ("stage1_shapes", "stage.params.cpu_threads=0", "stage1.cpu_threads"),
        ("quickstart", "+stage.params.data.shard_dirr=x", "quickstart.data"),
        ("quickstart", "tokenizer.encoder.freeze=true", "quickstart.tokenizer.encoder.freeze"),
        ("eval_shapes", "stage.params.batch_size=0", "batch_size"),
    ],
)
def test_bad_value_fails_at_compose_naming_the_key(exp: str, override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(compose_experiment(exp, [override]))
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("tokenizer.clustering.mechanism=dynmic", "tokenizer.clustering.mechanism"),
        ("+stage.params.kl_epss=1", "kl_epss"),  # an unknown stage param
    ],
)
def test_dry_run_with_a_bad_value_exits_2_before_anything_is_written(
    override: str, key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["+exp=quickstart", override, f"run_root={tmp_path}"]
    assert main([*argv, "--dry-run"]) == 2
    assert key in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
