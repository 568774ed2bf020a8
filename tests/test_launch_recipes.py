"""The SeTokIM cluster recipes (Vicuna-7B/13B, Stages II and III) carry paper Table 7."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from setok_experiments.cli import main
from setok_experiments.compose import (
    ConfigError,
    compose_experiment,
    load_experiment,
    validate,
)
from setok_experiments.schema import ExperimentConfig
from setokim.model.config import SeTokIMConfig
from setokim.stages import build_stage
from setokim.stages.pipeline import trainer_config
from setokim.train.config import TrainerConfig, resolve_schedule

# (exp, stage, Table 7 lr, LLM width, the init key the user must give)
RECIPES = [
    ("setokim_vicuna7b_stage2", "stage2", 4e-3, 4096, "init_tokenizer"),
    ("setokim_vicuna13b_stage2", "stage2", 4e-3, 5120, "init_tokenizer"),
    ("setokim_vicuna7b_stage3", "stage3", 5e-4, 4096, "init_from"),
    ("setokim_vicuna13b_stage3", "stage3", 5e-4, 5120, "init_from"),
]


@pytest.fixture()
def init_dirs(tmp_path: Path) -> dict[str, Path]:
    """The previous stages' outputs the recipes need: a Stage I export dir and a Stage II
    export's config (all that composing a Stage III run reads from it)."""
    stage1 = tmp_path / "stage1_export"
    (stage1 / "tokenizer").mkdir(parents=True)
    stage2 = tmp_path / "stage2_export"
    stage2.mkdir()
    (stage2 / "setokim_config.json").write_text(json.dumps(asdict(SeTokIMConfig())))
    return {"init_tokenizer": stage1, "init_from": stage2}


def _init_override(key: str, dirs: dict[str, Path]) -> str:
    return f"stage.params.steps.0.params.{key}={dirs[key]}"


@pytest.mark.parametrize(("exp", "stage", "lr", "width", "init_key"), RECIPES)
def test_recipe_composes_with_table7_settings(
    exp: str, stage: str, lr: float, width: int, init_key: str, init_dirs: dict[str, Path]
) -> None:
    composed = compose_experiment(exp, [_init_override(init_key, init_dirs)])
    cfg = validate(composed)
    assert isinstance(cfg, ExperimentConfig) and cfg.name == exp
    t = cfg.trainer
    assert t.lr == pytest.approx(lr)
    assert t.weight_decay == pytest.approx(1e-3)
    assert t.epochs == 1.0 and t.warmup_ratio == pytest.approx(0.1)
    assert t.micro_batch_size == 32 and t.min_lr_ratio == 0.0
    assert (t.mixed_precision, t.fsdp, t.activation_checkpointing) == ("bf16", "on", True)
    assert cfg.launcher.kind == "slurm"
    assert cfg.cluster.nodes == 2  # paper Appendix D.2: 16 GPUs (2 x 8 on gpu_a100)
    assert cfg.mllm.llm.hidden_size == width
    size = "13b" if width == 5120 else "7b"
    assert cfg.mllm.llm.pretrained_path.endswith(f"vicuna-{size}-v1.5")

    # The job runs a one-step pipeline (so it exports); its trainer is the experiment's.
    assert cfg.stage.name == "pipeline"
    # What the job hands the stage registry: the resolved params mapping.
    pipeline = build_stage("pipeline", OmegaConf.to_container(composed.stage.params, resolve=True))
    ((name, params, step_trainer),) = pipeline.steps
    assert name == stage and params["max_text_tokens"] == 2048
    assert params[init_key] == str(init_dirs[init_key])
    assert params["data"]["shard_dir"].endswith(f"setokim_{stage}")
    assert trainer_config(step_trainer, pipeline.trainer) == t


@pytest.mark.parametrize(("exp", "stage", "lr", "width", "init_key"), RECIPES[:1] + RECIPES[2:3])
def test_recipe_schedule_at_paper_scale(
    exp: str, stage: str, lr: float, width: int, init_key: str, init_dirs: dict[str, Path]
) -> None:
    """16 GPUs x 32: Stage II's 558K + 695K captions, Stage III's 665K + 15K samples."""
    cfg = load_experiment(exp, [_init_override(init_key, init_dirs)])
    samples = 558_000 + 695_000 if stage == "stage2" else 665_000 + 15_000
    per_rank = (samples // 16) // cfg.trainer.micro_batch_size  # full micro-batches per GPU
    out = resolve_schedule(cfg.trainer, per_rank, world_size=16)
    assert (out.max_steps, out.warmup_steps) == ((2447, 245) if stage == "stage2" else (1328, 133))
    assert (out.lr, out.epochs) == (cfg.trainer.lr, 1.0)


@pytest.mark.parametrize(("exp", "init_key"), [(r[0], r[4]) for r in RECIPES])
def test_recipe_needs_the_previous_stage(
    exp: str, init_key: str, init_dirs: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=init_key):
        load_experiment(exp)
    with pytest.raises(ConfigError, match=init_key):
        load_experiment(exp, [f"stage.params.steps.0.params.{init_key}={tmp_path / 'missing'}"])


def test_stage1_recipes_use_the_ratio_and_epochs(tmp_path: Path) -> None:
    s1 = load_experiment("stage1").trainer
    assert (s1.max_steps, s1.epochs, s1.warmup_ratio) == (50_000, None, 0.1)
    assert resolve_schedule(s1, None, 16).warmup_steps == 5000
    step = tmp_path / "checkpoints" / "step_00050000"  # a sub-phase-1 step directory
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    s2 = load_experiment("stage1_phase2", [f"stage.params.init_from={step}"])
    assert s2.trainer.lr_groups == {"setok.encoder.*": pytest.approx(1e-3)}
    assert s1.lr_groups == {}  # sub-phase 1: the encoder is frozen
    assert (s2.trainer.epochs, s2.trainer.warmup_ratio, s2.trainer.lr) == (1.0, 0.1, 4e-3)


def test_stage1_recipe_builds_the_papers_setok() -> None:
    """Paper Appendix D: ViT-G/14 at 336 px (576 patches), merger 2 blocks x 2 heads; the
    Stage II/III recipes take their SeTok from this recipe's export."""
    tok = OmegaConf.create(load_experiment("stage1").tokenizer)
    assert tok.encoder.image_size == 336 and 336 // 14 == 24  # 24 x 24 = 576 patches
    assert (tok.merger.num_blocks, tok.merger.num_heads) == (2, 2)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.epochs=0", "epochs"),
        ("trainer.warmup_ratio=1.5", "warmup_ratio"),
        ("trainer.epochs=many", "trainer.epochs"),
    ],
)
def test_bad_schedule_value_exits_2_naming_the_key(
    override: str,
    key: str,
    init_dirs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["+exp=setokim_vicuna7b_stage2", _init_override("init_tokenizer", init_dirs)]
    assert main([*args, override, f"run_root={tmp_path / 'runs'}", "--dry-run"]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # over 5 s
@pytest.mark.parametrize(("exp", "init_key"), [(r[0], r[4]) for r in RECIPES])
def test_dry_run_prints_the_plan(
    exp: str,
    init_key: str,
    init_dirs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The weights live on the cluster: --dry-run plans anyway and warns about each path it
    cannot read here; the same launch without --dry-run refuses before queueing."""
    root = tmp_path / "runs"
    llm = tmp_path / "cluster_only" / "vicuna"  # the cluster's weights, not on this machine
    args = [
        f"+exp={exp}",
        "launcher=slurm",
        "cluster=gpu_a100",
        "cluster.nodes=2",
        f"mllm.llm.pretrained_path={llm}",
        _init_override(init_key, init_dirs),
        f"run_root={root}",
    ]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"exp={exp} launcher=slurm cluster=gpu_a100 jobs=1" in out
    assert f"stage.params.steps.0.params.{init_key}=" in out
    warning = (
        f"warning: stage.params.steps.0.params.model.llm.pretrained_path: {llm} does not exist"
    )
    assert warning in out and "(a launch refuses this)" in out
    assert "dry run: nothing written, nothing queued" in out
    assert not root.exists()

    assert main(args) == 2
    captured = capsys.readouterr()
    assert "refused before queueing: " in captured.err and f"{llm} does not exist" in captured.err
    assert "jobs=1" not in captured.out
    assert not root.exists()


def test_trainer_defaults_keep_step_schedules() -> None:
    """Configs without epochs / warmup_ratio (every CPU experiment) are left as they are."""
    cfg = load_experiment("smoke_toy").trainer
    assert (cfg.epochs, cfg.warmup_ratio) == (None, None)
    assert resolve_schedule(cfg, None, 1) is cfg
    assert TrainerConfig().epochs is None
