"""Before anything queues: the resource plan of every cluster recipe (models on the meta
device from config files only), and the preflight refusals (missing path, `???`, memory)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from setok_experiments.cli import main
from setok_experiments.compose import ConfigError
from setok_experiments.plan import build_plan, check_before_queue


def _vit_g() -> dict:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=1664,
        intermediate_size=8192,
        num_hidden_layers=48,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
    ).to_dict()


def _stage1_weights(weights: Path) -> None:
    """Config files of Stage I's paper-scale parts: ViT-G, SD 1.5's U-Net and VAE, BERT-base."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import BertConfig

    (weights / "vit-g").mkdir()
    (weights / "vit-g" / "config.json").write_text(json.dumps(_vit_g()))
    (weights / "bert-base-uncased").mkdir()
    (weights / "bert-base-uncased" / "config.json").write_text(BertConfig().to_json_string())
    sd15 = weights / "stable-diffusion-v1-5"
    with torch.device("meta"):  # only the config is saved
        unet = UNet2DConditionModel.from_config(
            {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}
        )
        vae = AutoencoderKL.from_config(
            {
                "block_out_channels": [128, 256, 512, 512],
                "down_block_types": ["DownEncoderBlock2D"] * 4,
                "up_block_types": ["UpDecoderBlock2D"] * 4,
                "latent_channels": 4,
                "layers_per_block": 2,
                "sample_size": 512,
            }
        )
    unet.save_config(sd15 / "unet")
    vae.save_config(sd15 / "vae")


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """SETOK_WEIGHTS / SETOK_DATA with configuration files only (no weights): what the plan
    reads; the shard dirs exist (empty)."""
    from transformers import LlamaConfig

    from setok_tokenizer.config import SeTokConfig
    from setok_tokenizer.setok import CONFIG_NAME, ENCODER_CONFIG_NAME

    weights, data = tmp_path / "weights", tmp_path / "data"
    for name, size in (
        ("vicuna-7b-v1.5", (4096, 32, 11008)),
        ("vicuna-13b-v1.5", (5120, 40, 13824)),
    ):
        d = weights / name
        d.mkdir(parents=True)
        hidden, layers, inter = size
        cfg = LlamaConfig(
            vocab_size=32000, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=hidden // 128, intermediate_size=inter,
            max_position_embeddings=4096,
        )  # fmt: skip
        (d / "config.json").write_text(cfg.to_json_string())
        (d / "tokenizer_config.json").write_text("{}")
    export = tmp_path / "stage1_export" / "tokenizer"
    export.mkdir(parents=True)
    setok = asdict(SeTokConfig())
    setok["encoder"].update(family="clip", image_size=224, layer="penultimate")
    setok["clustering"]["max_clusters"] = 32
    (export / CONFIG_NAME).write_text(json.dumps(setok))
    (export / ENCODER_CONFIG_NAME).write_text(json.dumps(_vit_g()))
    for name in ("setokim_stage2", "setokim_stage3", "stage1_cc3m_laion", "stage1_coco_sa1b"):
        (data / name).mkdir(parents=True)
    _stage1_weights(weights)
    # The shard-content check (data_check: enough samples of each task for one global
    # batch) needs real shards; it has its own tests. Here the shard dirs are empty.
    monkeypatch.setattr("setok_experiments.plan.check_data", lambda *a, **k: None)
    monkeypatch.setenv("SETOK_WEIGHTS", str(weights))
    monkeypatch.setenv("SETOK_DATA", str(data))
    return tmp_path


def _stage2(world: Path, *extra: str) -> list[str]:
    return [
        f"run_root={world / 'runs'}",
        "cluster=gpu_a100",  # 2 nodes: the recipe's own (paper: 16 GPUs)
        f"stage.params.steps.0.params.init_tokenizer={world / 'stage1_export'}",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("size", ["7b", "13b"])
def test_stage2_recipe_plans_on_the_meta_device_and_fits_80gb(world: Path, size: str) -> None:
    exp = f"setokim_vicuna{size}_stage2"
    plan = build_plan(exp, _stage2(world))
    plan, lines = check_before_queue(plan, exp, _stage2(world))
    text = "\n".join(lines)
    assert "2 node(s) x 8 GPU(s) = 16 rank(s)" in text
    assert "512 = 32 per GPU x 1 accum x 16" in text
    assert "wandb.mode=online switched to offline" in text  # gpu_a100 is marked offline
    assert plan.jobs[0].config.wandb.mode == "offline"
    assert "prefill FLOPs per sample" in text and "memory per GPU" in text


@pytest.mark.slow
def test_stage2_without_activation_checkpointing_is_refused_naming_the_term(world: Path) -> None:
    exp = "setokim_vicuna7b_stage2"
    overrides = _stage2(world, "trainer.activation_checkpointing=false")
    with pytest.raises(ConfigError, match=r"activations .*activation_checkpointing=true"):
        check_before_queue(build_plan(exp, overrides), exp, overrides)


def test_a_missing_weights_path_refuses_before_queueing(
    world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = _stage2(world, "mllm.llm.pretrained_path=" + str(world / "nowhere"))
    code = main(["plan", "+exp=setokim_vicuna7b_stage2", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert "refused before queueing" in err and "pretrained_path" in err and "nowhere" in err


def test_a_required_value_that_composes_to_null_is_refused(world: Path) -> None:
    # stage1_phase2's `init_from: ???` is merged over the stage group's null: still required.
    from setok_experiments import preflight
    from setok_experiments.compose import load_experiment

    cfg = load_experiment("stage1_phase2")
    assert cfg.stage.params["init_from"] is None
    with pytest.raises(ConfigError, match=r"stage.params.init_from: must be given"):
        preflight.check_required("stage1_phase2", cfg)


def test_checkpoints_of_another_world_size_are_refused(tmp_path: Path) -> None:
    from setok_experiments.preflight import check_resume_world_size
    from setokim.train import TrainerConfig

    step = tmp_path / "stage2" / "train" / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    state = {
        "step": 10, "data_position": 10, "skipped_steps": 0, "nonfinite_in_row": 0,
        "world_size": 8, "scheduler": {}, "micro_batch_size": 32, "grad_accum": 1,
    }  # fmt: skip
    (step / "trainer_state.json").write_text(json.dumps(state))
    check_resume_world_size(tmp_path, 8)
    with pytest.raises(ConfigError, match=r"written by 8 rank\(s\), this run has 16"):
        check_resume_world_size(tmp_path, 16)
    # Resharding is allowed when the global batch (32 x 1 x 8 = 256) is kept ...
    reshard = TrainerConfig(micro_batch_size=16, world_size_change="reshard")
    check_resume_world_size(tmp_path, 16, reshard)
    # ... and refused naming both batches when it is not.
    reshard = TrainerConfig(micro_batch_size=32, world_size_change="reshard")
    with pytest.raises(ConfigError, match=r"was 256 .* would be 512"):
        check_resume_world_size(tmp_path, 16, reshard)


def _stage2_export(world: Path, name: str, llm: str) -> Path:
    """A Stage II export's config file only (what the checks and the plan read): `llm`'s
    transformers config, the recipe's bf16 LLM, the Stage I SeTok."""
    export = world / name
    export.mkdir(parents=True)
    source = world / "weights" / llm
    config = {
        "llm_config": json.loads((source / "config.json").read_text()),
        "llm": {"pretrained_path": str(source), "dtype": "bfloat16"},
        "tokenizer_path": str(world / "stage1_export"),
    }
    (export / "setokim_config.json").write_text(json.dumps(config))
    return export


def test_13b_stage3_refuses_a_7b_stage2_export(world: Path) -> None:
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from setok_experiments import preflight
    from setok_experiments.compose import compose_experiment

    def recipe(export: Path) -> SimpleNamespace:
        """The 13B Stage III recipe's values (a full validation would load the export)."""
        key = "stage.params.steps.0.params.init_from"
        composed = compose_experiment("setokim_vicuna13b_stage3", [f"{key}={export}"])
        params = OmegaConf.to_container(composed.stage.params, resolve=True)
        mllm = OmegaConf.to_object(composed.mllm)
        return SimpleNamespace(mllm=mllm, stage=SimpleNamespace(params=params))

    seven = _stage2_export(world, "export_7b", "vicuna-7b-v1.5")
    thirteen = _stage2_export(world, "export_13b", "vicuna-13b-v1.5")
    preflight.check_export_llm(recipe(thirteen))  # the same LLM: accepted
    with pytest.raises(ConfigError, match=r"hidden_size=4096.*has 5120"):
        preflight.check_export_llm(recipe(seven))


EXPERIMENTS = sorted(
    p.stem
    for p in (Path(__file__).resolve().parents[1] / "experiments/conf/exp").glob("*.yaml")
    if not p.stem.startswith("_")
)
PAPER_SCALE = {"stage1", "stage1_phase2"} | {
    f"setokim_vicuna{size}_stage{n}" for size in ("7b", "13b") for n in (2, 3)
}


def _slurm_overrides(exp: str, world: Path) -> list[str]:
    """`launcher=slurm` (on gpu_a100 for the paper-scale recipes) and the values each
    experiment leaves to the command line."""
    out = [f"run_root={world / 'runs'}", "launcher=slurm"]
    if exp in PAPER_SCALE:
        out.append("cluster=gpu_a100")
    if exp.startswith("setokim_vicuna") and exp.endswith("stage2"):
        out.append(f"stage.params.steps.0.params.init_tokenizer={world / 'stage1_export'}")
    if exp.startswith("setokim_vicuna") and exp.endswith("stage3"):
        size = exp.removeprefix("setokim_vicuna").split("_")[0]
        export = _stage2_export(world, "stage2_export", f"vicuna-{size}-v1.5")
        out.append(f"stage.params.steps.0.params.init_from={export}")
    if exp == "stage1_phase2":  # sub-phase 1's last checkpoint step
        step = world / "stage1_step"
        step.mkdir()
        (step / "trainer_state.json").write_text("{}")
        out.append(f"stage.params.init_from={step}")
    if exp == "eval":
        (world / "data" / "shapes_world").mkdir()
        out += ["stage.params.tiny_random=true", f"stage.params.shard_dir={world / 'data'}"]
    return out


def _rows(table: str) -> dict[str, str]:
    """{term: value} of one printed plan table."""
    rows = {}
    for line in table.splitlines()[3:]:
        term, _, value = line.partition("  ")
        rows[term.strip()] = value.strip()
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_plan_of_every_experiment_under_slurm(
    exp: str, world: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`launch.py plan +exp=NAME launcher=slurm` builds every Stage I-III step on the meta
    device and prints its table; the other steps are noted as not sized."""
    from setok_experiments.compose import load_experiment

    overrides = _slurm_overrides(exp, world)
    code = main(["plan", f"+exp={exp}", *overrides])
    out, err = capsys.readouterr()
    assert code == 0, err
    cfg = load_experiment(exp, overrides)
    steps = [cfg.stage.name]
    if cfg.stage.name == "pipeline":
        steps = [s["name"] for s in cfg.stage.params["steps"]]
    tables = {t.split(":", 1)[0]: _rows(t) for t in out.split("plan of ")[1:]}
    c = cfg.cluster
    world_size = c.nodes * c.tasks_per_node
    for step in steps:
        if step not in ("stage1", "stage2", "stage3"):
            assert step == "eval" or f"step {step!r} is not sized" in out
            continue
        rows = tables[step]
        assert rows["hardware"] == (
            f"{c.nodes} node(s) x {c.gpus_per_node} GPU(s) = {world_size} rank(s)"
        )
        assert rows["global batch"].endswith(f"x {world_size}")
        total = float(rows["memory per GPU"].split()[0])
        terms = sum(float(v.split()[0]) for k, v in rows.items() if k.startswith("memory: "))
        assert total == pytest.approx(terms, abs=0.3)
        assert total > 0
    assert "would queue" in out
    if exp in PAPER_SCALE:  # 8 GPUs of 80 GB per node, 32 samples per GPU, and it fits
        rows = tables[steps[0]]
        assert rows["global batch"] == f"{32 * world_size} = 32 per GPU x 1 accum x {world_size}"
        assert rows["memory per GPU"].endswith("of 80 GB") and total < 80 * 0.9
        params = float(rows["parameters"].split()[0])
        if exp.startswith("setokim_vicuna"):  # the paper's 16 GPUs, the LLM from its config
            assert rows["hardware"] == "2 node(s) x 8 GPU(s) = 16 rank(s)"
            assert params > (13.0 if "13b" in exp else 6.7)
        else:  # SD 1.5's U-Net (0.86 B) + ViT-G + Q-Former
            assert params > 0.86 + 1.0
