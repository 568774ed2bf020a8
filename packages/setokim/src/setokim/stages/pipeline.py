"""Run stages in sequence (Stage I -> II -> III), each in `run_dir/<stage>/`, each resumable.

Per step: `train()` in `<stage>/train/` (resumes from its own checkpoints), then the
trained model is exported to `<stage>/export/` (written to a temp dir and renamed), then
`<stage>/pipeline_step.json` records the result. A relaunch skips every step that has that
record, so a killed pipeline continues with the step it was in. The next step's init path
(`INIT_KEYS`) is set to the previous export unless its params already give one.

Exports: each objective's `export(checkpoint, out_dir)`: stage1 -> `stage1.export_parts`
(tokenizer/, diffusion/, mask_decoder/), stage2 / stage3 -> `SeTokIM.save_pretrained`
(stage2 on several ranks: a sharded export that every rank writes).

Several ranks: every rank trains (in one process group the pipeline joins for all steps);
a stage with `collective_export` (Stage II) is exported by every rank, each writing its
shard (`export_collective`); other stages are exported by rank 0 while the others wait for
the step record.

CLI (a plain YAML/JSON file with `trainer` defaults and `steps`, as in the experiment's
`stage.params` when `stage.name: pipeline`):
    python -m setokim.stages.pipeline --config steps.yaml --run-dir runs/setokim_shapes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from setok_tokenizer.config import from_dict, require
from setokim.train.config import TrainerConfig, WandbConfig
from setokim.train.result import TrainResult
from setokim.utils.io import atomic_write_json

RECORD = "pipeline_step.json"
INIT_KEYS: dict[str, str] = {"stage2": "init_tokenizer", "stage3": "init_from"}
StepSpec = tuple[str, Mapping[str, Any], "TrainerConfig | Mapping[str, Any]"]


@dataclass
class StepRecord:
    """What one finished step left behind (also `<stage>/pipeline_step.json`)."""

    name: str
    step: int
    last_loss: float
    export: str | None
    checkpoint: str | None
    skipped: bool = False  # True when this launch found the step already done
    seconds: float = 0.0


@dataclass
class PipelineResult:
    steps: list[StepRecord] = field(default_factory=list)
    preempted: bool = False
    last: TrainResult | None = None  # of the last step trained in this launch

    def export(self, name: str) -> Path | None:
        for rec in self.steps:
            if rec.name == name and rec.export:
                return Path(rec.export)
        return None


def trainer_config(
    spec: TrainerConfig | Mapping[str, Any], base: Mapping[str, Any]
) -> TrainerConfig:
    """A TrainerConfig, or a partial mapping over `base` (the pipeline's trainer defaults)."""
    return from_dict(TrainerConfig, spec, from_dict(TrainerConfig, base), "trainer")


def _rank() -> int:
    """This process's rank: the process group's when one is joined (a group started with an
    explicit rank has no RANK variable), else the launcher's environment."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def read_record(step_dir: Path) -> StepRecord | None:
    path = step_dir / RECORD
    if not path.is_file():
        return None
    return StepRecord(**json.loads(path.read_text(encoding="utf-8")))


def export_step(stage: Any, checkpoint: Path, out: Path, install: bool = True) -> Path | None:
    """Export the trained model of one step to `out` atomically; None when the stage has none.

    With a process group every rank must call this: reading a checkpoint is collective
    (verification and DCP load). Each rank writes into its own temporary directory and only
    the one with `install` (rank 0) moves it to `out`.
    """
    exporter = getattr(stage, "export", None)
    if not callable(exporter):
        return None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        exporter(checkpoint, tmp / "final")
        if install:
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp / "final", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def collective(stage: Any) -> bool:
    """True when every rank exports `stage` (its `collective_export`, several ranks)."""
    import torch.distributed as dist

    wanted = bool(getattr(stage, "collective_export", False))
    return wanted and dist.is_initialized() and dist.get_world_size() > 1


def export_collective(stage: Any, checkpoint: Path, out: Path) -> Path:
    """Every rank: `stage.export` writes `out` itself, atomically and resumably (a killed
    export keeps its finished shards); a complete `out` that a kill left without its step
    record is written again."""
    import torch.distributed as dist

    if _rank() == 0 and out.exists():
        shutil.rmtree(out)
    dist.barrier()
    return Path(stage.export(checkpoint, out))


def _wait_for_record(step_dir: Path, timeout_s: float = 3600.0) -> StepRecord:
    start = time.monotonic()
    while (rec := read_record(step_dir)) is None:
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"rank {_rank()}: rank 0 did not finish exporting {step_dir}")
        time.sleep(1.0)
    return rec


def run_pipeline(
    steps: Sequence[StepSpec],
    run_dir: str | os.PathLike[str],
    wandb: WandbConfig | None = None,
    *,
    trainer_defaults: Mapping[str, Any] | None = None,
) -> PipelineResult:
    """Train and export `steps` = [(stage name, stage params, trainer cfg or mapping), ...]."""
    from setokim.train.distributed import (
        detect_env,
        init_distributed,
        select_device,
        shutdown_distributed,
    )

    names = [s[0] for s in steps]
    if not steps:
        raise ValueError("steps: the pipeline is empty")
    if len(set(names)) != len(names):
        raise ValueError(
            f"steps: stage names must be unique (each gets run_dir/<name>), got {names}"
        )
    env = detect_env()  # one group for every step, so a collective export still has it
    created = init_distributed(env, select_device(env))
    try:
        return _run_steps(steps, Path(run_dir), wandb, dict(trainer_defaults or {}))
    finally:
        shutdown_distributed(created)


def _run_steps(
    steps: Sequence[StepSpec], root: Path, wandb: WandbConfig | None, base: dict[str, Any]
) -> PipelineResult:
    from setokim.stages import build_stage
    from setokim.train import train

    root.mkdir(parents=True, exist_ok=True)
    result = PipelineResult()
    previous: Path | None = None
    for index, (name, params, trainer_spec) in enumerate(steps):
        step_dir = root / name
        rec = read_record(step_dir)
        if rec is not None:
            rec.skipped = True
            result.steps.append(rec)
            previous = Path(rec.export) if rec.export else None
            print(f"pipeline: step {index} {name!r} already done (step {rec.step}), skipping")
            continue
        params = dict(params)
        key = INIT_KEYS.get(name)
        if key is not None and params.get(key) is None and previous is not None:
            params[key] = str(previous)
        trainer = trainer_config(trainer_spec, base)
        stage = build_stage(name, params)
        step_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        out = train(stage, trainer, step_dir / "train", wandb)
        result.last = out
        if out.preempted:
            result.preempted = True
            print(f"pipeline: step {index} {name!r} preempted at step {out.step}; relaunch resumes")
            return result
        if out.checkpoint is None:
            raise RuntimeError(f"step {name!r}: training left no checkpoint to export")
        if collective(stage):
            export = export_collective(stage, out.checkpoint, step_dir / "export")
        else:
            export = export_step(stage, out.checkpoint, step_dir / "export", _rank() == 0)
        if _rank() != 0:
            rec = _wait_for_record(step_dir)
        else:
            rec = StepRecord(
                name=name,
                step=out.step,
                last_loss=out.last_loss,
                export=None if export is None else str(export.resolve()),
                checkpoint=str(out.checkpoint),
                seconds=time.perf_counter() - start,
            )
            atomic_write_json(step_dir / RECORD, asdict(rec))
        result.steps.append(rec)
        previous = Path(rec.export) if rec.export else None
    return result


@dataclass
class PipelineStep:
    """One step: a registered objective, its params (its own config, checked when the
    pipeline is built) and trainer keys over the pipeline's `trainer`."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineConfig:
    """The "pipeline" params: trainer defaults and the steps in order, each step's stage
    config and merged trainer config checked before anything runs (init paths are filled
    in at run time from the previous step's export)."""

    steps: list[PipelineStep]
    trainer: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from setokim.stages import build_stage

        names = [s.name for s in self.steps]
        require(bool(names), self, "steps", "must be a non-empty list of {name, params, trainer}")
        require(len(set(names)) == len(names), self, "steps", f"names must be unique: {names}")
        for i, step in enumerate(self.steps):
            try:
                require(step.name != "pipeline", step, "name", "a step cannot be a pipeline")
                build_stage(step.name, step.params)
                trainer_config(step.trainer, self.trainer)
            except (ValueError, TypeError, KeyError) as err:
                raise ValueError(f"pipeline: steps[{i}] ({step.name}): {err}") from None


@dataclass
class Pipeline:
    """The registry's "pipeline" entry: validated steps that `run(run_dir)` trains in order.

    Not a `train.Stage`: a launcher calls `run` instead of `train(stage, ...)`.
    """

    steps: list[tuple[str, dict[str, Any], dict[str, Any]]]
    trainer: dict[str, Any]

    def run(self, run_dir: str | os.PathLike[str], wandb: WandbConfig | None = None) -> TrainResult:
        res = run_pipeline(self.steps, run_dir, wandb, trainer_defaults=self.trainer)
        if res.last is not None:
            return res.last
        rec = res.steps[-1]
        return TrainResult(
            step=rec.step, last_loss=rec.last_loss, skipped_steps=0,
            checkpoint=None if rec.checkpoint is None else Path(rec.checkpoint),
            preempted=False, resumed_from=rec.step, loop_seconds=0.0, samples_per_s=0.0,
            world_size=1,
        )  # fmt: skip


def build(cfg: Mapping[str, Any]) -> Pipeline:
    """Registry entry: {"trainer": defaults, "steps": [{"name", "params", "trainer"}, ...]}."""
    spec = from_dict(PipelineConfig, cfg, where="pipeline")
    return Pipeline([(s.name, s.params, s.trainer) for s in spec.steps], spec.trainer)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML/JSON with `trainer` and `steps`")
    parser.add_argument("--run-dir", required=True, help="where run_dir/<stage>/ go")
    parser.add_argument("--wandb", default="disabled", choices=("offline", "online", "disabled"))
    args = parser.parse_args(argv)
    import yaml

    spec = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    if not isinstance(spec, Mapping):
        parser.error(f"--config {args.config}: expected a mapping with `steps`")
    pipeline = build(spec)
    res = run_pipeline(
        pipeline.steps,
        args.run_dir,
        WandbConfig(mode=args.wandb),
        trainer_defaults=pipeline.trainer,
    )
    for rec in res.steps:
        print(json.dumps(asdict(rec)))
    return 3 if res.preempted else 0


if __name__ == "__main__":
    sys.exit(main())
