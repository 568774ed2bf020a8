"""The registry's "study" entry: one row of a paper analysis (Tables 5, 8, 9, Figure 7).

A row is the whole SeTokIM pipeline (Stage I -> II -> III, `setokim.stages.pipeline`, the
recipe's `trainer` and `steps` unchanged but for the `budget`), then the eval suite on the
last export (`setokim.stages.evaluate`, into `run_dir/eval`), then the measurements the
paper's tables print beside the scores, in `run_dir/row.json`:

- visual tokens per test image (mean, range) and the LLM prefill FLOPs per VQA sample at
  those counts: on the row's own tiny LLM, and in the paper's setting (a Vicuna-7B config,
  576 patch tokens of a 24x24 grid vs the measured mean scaled from our grid to 24x24);
- training wall time per stage (from the pipeline's step records, so a resumed row keeps
  the time of the steps it did not redo);
- the density-peak seed scores of the test images' patch features (Figure 7b) and the
  same images clustered with a fixed number of clusters (Figure 7c), as `fixed_overlays.png`.

Every part resumes: finished pipeline steps are skipped, eval predictions are cached, and
the measurements are recomputed (seconds). Not a `train.Stage`: the launcher calls `run`.
`launch.py report` turns the rows of an experiment into the paper's table; `report` in
the params is what it reads (columns, the paper's figures) and is only checked here.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

from setok_tokenizer.config import require_min
from setokim.train.result import TrainResult
from setokim.utils.io import atomic_write_json

ROW_FILE = "row.json"
OVERLAY_FILE = "fixed_overlays.png"
PAPER_GRID = 576  # the paper's 24x24 patch grid (ViT-G/14 at 336 px)
# LLaMA-7B / Vicuna-7B (config.json of lmsys/vicuna-7b-v1.5): the paper's LLM for Table 5.
VICUNA_7B: dict[str, Any] = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
}
VQA_PROMPT = "{question}\nAnswer the question using a single word or phrase."


@dataclass
class StudyBudget:
    """How much of the recipe a row trains and evaluates (the same for every row).

    max_steps: step name -> cap on that step's max_steps (warmup scaled with it); a step
    not named keeps the recipe's. eval_limit: documents per task (None: all).
    test_images / train_images: the generated Shapes World's test and train split sizes
    (train_images None keeps the recipe's `generate_train`).
    """

    name: str = "default"
    max_steps: dict[str, int] = field(default_factory=dict)
    eval_limit: int | None = None
    test_images: int = 64
    train_images: int | None = None

    def __post_init__(self) -> None:
        for step, cap in self.max_steps.items():
            if int(cap) < 1:
                raise ValueError(f"study: budget.max_steps.{step} must be >= 1, got {cap}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(
                f"study: budget.eval_limit must be >= 1 or null, got {self.eval_limit}"
            )
        if self.test_images < 1:
            raise ValueError(f"study: budget.test_images must be >= 1, got {self.test_images}")


@dataclass
class StudyMeasure:
    """What `row.json` holds besides the eval. fixed_clusters: Figure 7c's k (None: no
    overlays); overlay_images: how many test images; seed_scores: keep Figure 7b's scores."""

    seed_scores: bool = True
    fixed_clusters: int | None = 10
    overlay_images: int = 4


@dataclass
class StudyInsert:
    """Table 9: SeTok inserted into a trained patch-token (LLaVA-style) model, then tuned.

    With `enabled`, the row's pipeline is the patch model's; then its Stage II export is
    copied with the tokenizer's clustering replaced by `clustering` (SeTok between the vision
    encoder and the connector: the encoder's patch features are clustered and merged, and the
    same projector maps each merged token to the LLM; no weight changes, since clustering has
    none), and Stage III is trained again from that copy for `fraction` of its steps (the
    small instruction split). The row is evaluated on that model.
    """

    enabled: bool = False
    clustering: dict[str, Any] = field(default_factory=lambda: {"mechanism": "dynamic"})
    fraction: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"study: insert_setok.fraction must be in (0, 1], got {self.fraction}")


@dataclass
class StudyConfig:
    """`stage.params` of a study row (unknown keys are rejected by `build`).

    trainer, steps: the pipeline spec of the recipe (`+exp=setokim_shapes`).
    eval: EvalStageConfig fields but `checkpoint` (the last step's export) and `limit`
    (the budget's eval_limit).
    paper_clusters: the fixed/resampler rows' cluster count in the paper's 24x24 grid; the
    row's Stage I tokenizer gets max(2, round(paper_clusters x grid / 576)) clusters.
    report: read by `launch.py report` (columns, the paper's figures); not by the job.
    """

    trainer: dict[str, Any]
    steps: list[dict[str, Any]]
    eval: dict[str, Any]
    budget: StudyBudget = field(default_factory=StudyBudget)
    measure: StudyMeasure = field(default_factory=StudyMeasure)
    paper_clusters: int | None = None
    report: dict[str, Any] = field(default_factory=dict)
    insert_setok: StudyInsert = field(default_factory=StudyInsert)

    def __post_init__(self) -> None:
        require_min(self, 1, "paper_clusters")


def scaled_clusters(paper_clusters: int, grid_tokens: int) -> int:
    """The paper's cluster count of a 576-token grid, scaled to `grid_tokens` (at least 2)."""
    return max(2, min(grid_tokens, round(paper_clusters * grid_tokens / PAPER_GRID)))


def _tokenizer_grid(tokenizer: Mapping[str, Any]) -> int:
    """Patch tokens of the Stage I tokenizer's feature grid (the encoder is built: tiny)."""
    from setok_tokenizer import SeTok
    from setok_tokenizer.config import SeTokConfig, from_dict

    h, w = SeTok.from_config(from_dict(SeTokConfig, tokenizer)).grid_size
    return int(h * w)


def budgeted_steps(cfg: StudyConfig, grid_tokens: int | None) -> list[dict[str, Any]]:
    """The recipe's steps with the budget's caps (and the row's scaled cluster count)."""
    out = []
    for raw in cfg.steps:
        step = json.loads(json.dumps(raw))  # a deep copy of plain data
        name = step["name"]
        params = step.setdefault("params", {})
        trainer = step.setdefault("trainer", {})
        cap = cfg.budget.max_steps.get(name)
        if cap is not None:
            recipe = int(trainer.get("max_steps", cfg.trainer.get("max_steps", cap)))
            if cap < recipe:
                warm = int(trainer.get("warmup_steps", cfg.trainer.get("warmup_steps", 0)))
                trainer["max_steps"] = int(cap)
                trainer["warmup_steps"] = min(int(cap) - 1, math.ceil(warm * cap / recipe))
                for key in ("subphase0_batches", "subphase1_batches"):  # Stage I's shares
                    if name == "stage1" and key in params:
                        params[key] = math.ceil(int(params[key]) * cap / recipe)
        if cfg.budget.train_images is not None and "generate_train" in params:
            params["generate_train"] = cfg.budget.train_images
        if name == "stage1" and cfg.paper_clusters is not None and grid_tokens is not None:
            clustering = params.setdefault("tokenizer", {}).setdefault("clustering", {})
            clustering["max_clusters"] = scaled_clusters(cfg.paper_clusters, grid_tokens)
        out.append(step)
    return out


def _steps_spec(steps: Sequence[Mapping[str, Any]]) -> list[tuple[str, dict, dict]]:
    return [
        (str(s["name"]), dict(s.get("params") or {}), dict(s.get("trainer") or {})) for s in steps
    ]


def _train_images(steps: Sequence[Mapping[str, Any]]) -> int:
    sizes = [int((s.get("params") or {}).get("generate_train", 0)) for s in steps]
    return max([*sizes, 8])


@dataclass
class StudyStage:
    """One row: pipeline, eval, measurements (see module doc)."""

    cfg: StudyConfig

    @property
    def steps(self) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
        """The recipe's pipeline steps, as `Pipeline.steps` lists them (before the budget)."""
        return _steps_spec(self.cfg.steps)

    def run(self, run_dir: str | os.PathLike[str], wandb: Any = None) -> TrainResult:
        from setok_tokenizer.config import from_dict
        from setokim.data.shapes_world import World
        from setokim.stages.common import ensure_dataset
        from setokim.stages.evaluate import EvalStage, EvalStageConfig
        from setokim.stages.pipeline import run_pipeline

        cfg = self.cfg
        root = Path(run_dir)
        done = _finished(root, cfg)
        if done is not None:  # a relaunch of a finished row: only the report is rewritten
            return done
        stage1 = next((s for s in cfg.steps if s["name"] == "stage1"), None)
        grid = None
        if stage1 is not None and "tokenizer" in (stage1.get("params") or {}):
            grid = _tokenizer_grid(stage1["params"]["tokenizer"])
        steps = budgeted_steps(cfg, grid)
        shard_dir = cfg.eval.get("shard_dir")
        if shard_dir and cfg.eval.get("generate_if_missing"):
            image_size = int(cfg.eval.get("generate_image_size") or 64)
            ensure_dataset(
                shard_dir, train=_train_images(steps), image_size=image_size,
                seed=int(cfg.eval.get("generate_seed", 0)), test=cfg.budget.test_images,
                world=from_dict(World, cfg.eval.get("world") or {}, where="eval.world"),
            )  # fmt: skip
        pipe = run_pipeline(_steps_spec(steps), root, wandb, trainer_defaults=cfg.trainer)
        if pipe.preempted:
            assert pipe.last is not None
            return pipe.last
        last = pipe.steps[-1]
        if cfg.insert_setok.enabled:
            inserted = insert_setok(cfg, steps, pipe, root, wandb)
            if inserted.preempted:
                assert inserted.last is not None
                return inserted.last
            pipe.steps.extend(replace(s, name=f"setok_{s.name}") for s in inserted.steps)
            last = inserted.steps[-1]
        if last.export is None:
            raise RuntimeError(f"study: the last step {last.name!r} left no export to evaluate")
        ev = {**cfg.eval, "checkpoint": last.export, "limit": cfg.budget.eval_limit}
        ev = from_dict(EvalStageConfig, ev, where="study.eval")
        start = time.perf_counter()
        result = EvalStage(ev).run(root, wandb)
        if result.preempted:
            return result
        eval_s = time.perf_counter() - start
        row = measure_row(cfg, Path(last.export), root, grid)
        row["budget"] = asdict(cfg.budget)
        row["steps"] = {s.name: {"step": s.step, "seconds": s.seconds} for s in pipe.steps}
        row["train_seconds"] = float(sum(s.seconds for s in pipe.steps))
        row["eval_seconds"] = eval_s
        row["paper_clusters"] = cfg.paper_clusters
        row["grid_tokens"] = grid
        atomic_write_json(root / ROW_FILE, row)
        return result


def insert_setok(
    cfg: StudyConfig, steps: list[dict[str, Any]], pipe: Any, root: Path, wandb: Any
) -> Any:
    """Table 9's second arm (see `StudyInsert`): the patch model's Stage II export with SeTok's
    clustering, then a short Stage III, in `root/insert/`."""
    from setokim.stages.common import copy_with_clustering
    from setokim.stages.pipeline import run_pipeline

    base = pipe.export("stage2")
    stage3 = next((s for s in steps if s["name"] == "stage3"), None)
    if base is None or stage3 is None:
        raise ValueError("study: insert_setok needs the recipe's stage2 and stage3 steps")
    target = copy_with_clustering(
        base, root / "insert" / "base", dict(cfg.insert_setok.clustering),
        (("setok/setok_config.json", ()), ("setokim_config.json", ("tokenizer",))),
    )  # fmt: skip
    params = {**dict(stage3.get("params") or {}), "init_from": str(target)}
    trainer = dict(stage3.get("trainer") or {})
    total = int(trainer.get("max_steps", cfg.trainer.get("max_steps", 1)))
    short = max(1, math.ceil(total * cfg.insert_setok.fraction))
    warm = int(trainer.get("warmup_steps", cfg.trainer.get("warmup_steps", 0)))
    trainer.update(max_steps=short, warmup_steps=min(short - 1, math.ceil(warm * short / total)))
    return run_pipeline(
        [("stage3", params, trainer)], root / "insert", wandb, trainer_defaults=cfg.trainer
    )


def _finished(root: Path, cfg: StudyConfig) -> TrainResult | None:
    """The result of a row whose steps, eval and row.json are all written, else None."""
    from setokim.stages.pipeline import read_record

    row = root / ROW_FILE
    records = [read_record(root / str(s["name"])) for s in cfg.steps]
    if not row.is_file() or not (root / "eval" / "results.json").is_file() or None in records:
        return None
    last = records[-1]
    assert last is not None
    print(f"study: {root} is finished (row.json, eval, {len(records)} steps); nothing to run")
    return TrainResult(
        step=last.step, last_loss=last.last_loss, skipped_steps=0,
        checkpoint=None if last.checkpoint is None else Path(last.checkpoint), preempted=False,
        resumed_from=last.step, loop_seconds=0.0, samples_per_s=0.0, world_size=1,
    )  # fmt: skip


def _eval_images(data_root: Path, task: str, limit: int | None) -> tuple[list[dict], list[str]]:
    path = data_root / "data" / "eval" / f"{task}.jsonl"
    docs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    docs = sorted(docs, key=lambda d: str(d["id"]))[:limit] if limit else docs
    return docs, sorted({str(d["image"]) for d in docs})


def measure_row(cfg: StudyConfig, export: Path, root: Path, grid: int | None) -> dict[str, Any]:
    """Token counts, prefill FLOPs (tiny LLM and the paper's setting), seed scores and the
    fixed-k overlays of the test images, for `row.json`."""
    import numpy as np
    import torch
    from PIL import Image

    from setok_eval.metrics.flops import prefill_flops_per_sample
    from setokim.model.inference import Generator
    from setokim.model.setokim import SeTokIM
    from setokim.stages.evaluate import DATA_SUBDIR

    data_root = Path(cfg.eval.get("data_root") or root / DATA_SUBDIR)
    model = SeTokIM.from_pretrained(export)
    model.eval()
    setok = model.vision_tokenizer
    size = setok.cfg.encoder.image_size
    # Token counts and seed scores over every test image; FLOPs over the evaluated questions.
    docs, _ = _eval_images(data_root, "shapes_vqa", cfg.budget.eval_limit)
    _, keys = _eval_images(data_root, "shapes_vqa", None)
    eval_dir = data_root / "data" / "eval"

    def load(key: str) -> torch.Tensor:
        rgb = Image.open(eval_dir / key).convert("RGB").resize((size, size))
        return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255.0

    images = [load(k) for k in keys]
    pixels = torch.stack(images)
    with torch.no_grad():
        out = setok(setok.preprocess(pixels))
    counts = out.num_tokens.float()
    h, w = setok.grid_size
    grid_tokens = int(h * w)
    per_image = dict(zip(keys, counts.tolist(), strict=True))
    gen = Generator(model)
    samples = [
        gen.prompt_sample([images[keys.index(d["image"])]], VQA_PROMPT.format(**d)) for d in docs
    ]
    text = [int(t) for t in model.collate(samples).text_len]
    vis = [int(per_image[d["image"]]) for d in docs]
    llm = model.llm.config.to_dict()
    mean = float(counts.mean())
    paper_tokens = round(mean * PAPER_GRID / grid_tokens)
    flops_tiny = prefill_flops_per_sample(llm, text, vis, causal=True)
    flops_7b = prefill_flops_per_sample(VICUNA_7B, text, paper_tokens, causal=True)
    flops_7b_patch = prefill_flops_per_sample(VICUNA_7B, text, PAPER_GRID, causal=True)
    row: dict[str, Any] = {
        "mechanism": setok.cfg.clustering.mechanism,
        "assignment": setok.cfg.clustering.assignment,
        "max_clusters": setok.cfg.clustering.max_clusters,
        "encoder": setok.cfg.encoder.family,
        "merger": {"enabled": setok.cfg.merger.enabled, "use_pe": setok.cfg.merger.use_pe},
        "images": len(keys),
        "grid_tokens": grid_tokens,
        "tokens_per_image": counts.tolist(),
        "tokens_mean": mean,
        "tokens_min": int(counts.min()),
        "tokens_max": int(counts.max()),
        "text_tokens_mean": float(np.mean(text)),
        "tflops_tiny": float(np.mean(flops_tiny)) / 1e12,
        "paper_setting_tokens": paper_tokens,
        "tflops_paper_setting": float(np.mean(flops_7b)) / 1e12,
        "tflops_paper_setting_patch576": float(np.mean(flops_7b_patch)) / 1e12,
    }
    if cfg.measure.seed_scores and setok.resampler is None:
        feats = setok.normalise(out.features.reshape(len(keys), grid_tokens, -1))
        from setok_tokenizer.clustering import density_peak_scores

        scores = density_peak_scores(feats, setok.cfg.clustering.knn_k)
        row["seed_scores"] = [round(float(s), 5) for s in scores.score.flatten().tolist()]
    if cfg.measure.fixed_clusters is not None and setok.resampler is None:
        from setok_tokenizer import SeTok

        c = setok.cfg.clustering
        fixed = SeTok.from_config(
            replace(
                setok.cfg,
                clustering=replace(c, mechanism="fixed", max_clusters=cfg.measure.fixed_clusters),
            )
        )
        fixed.load_state_dict(setok.state_dict())
        fixed.eval()
        n = min(cfg.measure.overlay_images, len(keys))
        with torch.no_grad():
            masks = fixed(fixed.preprocess(pixels[:n])).masks
        from setok_eval.overlays import save_png, token_overlay

        tiles = []
        for i in range(n):
            labels = masks[i].argmax(0).numpy()
            img = (pixels[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            tiles.append(np.concatenate([img, token_overlay(img, labels)], axis=0))
        save_png(root / OVERLAY_FILE, np.concatenate(tiles, axis=1))
        row["fixed_overlays"] = OVERLAY_FILE
        row["fixed_clusters"] = cfg.measure.fixed_clusters
    return row


def build(cfg: Mapping[str, Any]) -> StudyStage:
    """Registry entry: checks the pipeline spec, the eval params and the budget (cheap)."""
    from setok_tokenizer.config import from_dict
    from setokim.stages.evaluate import EvalStageConfig
    from setokim.stages.pipeline import build as build_pipeline

    missing = [k for k in ("trainer", "steps", "eval") if k not in cfg]
    if missing:
        raise ValueError(f"study: params need {missing} (the recipe's pipeline and the eval)")
    trainer = cfg["trainer"]
    # The launcher's resolved config may hold the typed TrainerConfig of `${trainer}`.
    trainer = asdict(trainer) if is_dataclass(trainer) else dict(trainer)  # type: ignore[arg-type]
    study = from_dict(StudyConfig, {**cfg, "trainer": trainer}, where="study")
    build_pipeline({"trainer": trainer, "steps": study.steps})
    for key in ("checkpoint", "limit"):
        if key in study.eval:
            raise ValueError(
                f"study: eval.{key} is set by the study (last export, budget.eval_limit)"
            )
    # checks the values; the model comes later
    from_dict(EvalStageConfig, {**study.eval, "tiny_random": True}, where="study.eval")
    return StudyStage(study)
