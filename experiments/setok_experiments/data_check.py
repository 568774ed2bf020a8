"""The data part of the launch-time validation: every step's data against the shards.

`check_data` runs after a job's config validated (so at `--dry-run` too): each training step
(the stage, or every step of a pipeline) is checked with `setokim.data.preflight.check_step`
against the shard indexes, and a step that would get no full batch fails with a ConfigError
naming the step, the task and what the shards hold (launcher=slurm: a folder this machine
cannot see is noted, not checked). A `data.shard_dir` given on the command
line that holds no dataset is an error even when the recipe generates Shapes World
(`data.generate=true` in the Shapes World recipes): a mistyped path never trains silently
on generated data; add `data.generate=true` to the command to generate there on purpose.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from setok_experiments.compose import ConfigError
from setok_experiments.schema import ExperimentConfig

# stages that train against object masks (Stage I only in sub-phase 2)
_MASK_STAGES = {"quickstart"}


def _override_keys(overrides: Sequence[str]) -> set[str]:
    return {item.partition("=")[0].lstrip("+~") for item in overrides if "=" in item}


def _steps(obj: ExperimentConfig, params: dict[str, Any]) -> list[Any]:
    """StepData of every training step the job runs (eval and toy read no training data)."""
    from setokim.data.preflight import StepData
    from setokim.stages import build_stage

    name = obj.stage.name
    if name in ("pipeline", "study"):  # a study row trains a pipeline, then evaluates
        from setokim.stages.pipeline import build, trainer_config

        pipeline = build({k: params[k] for k in ("trainer", "steps")})
        specs = [
            (n, build_stage(n, p), trainer_config(t, pipeline.trainer).micro_batch_size)
            for n, p, t in pipeline.steps
        ]
    else:
        specs = [(name, build_stage(name, params), obj.trainer.micro_batch_size)]
    out = []
    for step, stage, micro in specs:
        data = getattr(getattr(stage, "cfg", None), "data", None)
        if data is None:
            continue
        cfg1 = getattr(stage, "cfg", None)  # Stage I's sub-phases 0 and 2 read object masks
        masks = step in _MASK_STAGES or (
            step == "stage1"
            and (getattr(cfg1, "subphase", 1) == 2 or getattr(cfg1, "subphase0_batches", 0) > 0)
        )
        data = replace(
            data, allow_missing_masks=data.allow_missing_masks or obj.data.allow_missing_masks
        )
        out.append(StepData(step, data, micro, masks))
    return out


def check_data(obj: ExperimentConfig, cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Raise ConfigError when a step's data cannot feed it; print notes to stderr."""
    from setokim.data.preflight import DataCheckError, check_step
    from setokim.data.shards import MANIFEST_NAME

    keys = _override_keys(overrides)
    shard_dir = Path(obj.data.shard_dir)
    if (
        obj.data.generate
        and "data.shard_dir" in keys
        and "data.generate" not in keys
        and not (shard_dir / MANIFEST_NAME).is_file()
    ):
        raise ConfigError(
            f"data.shard_dir: {str(shard_dir)!r} (given on the command line) holds no dataset; "
            "this recipe would generate Shapes World there. Fix the path, or add "
            "data.generate=true to generate on purpose"
        )
    params = OmegaConf.to_container(cfg.stage.params, resolve=True)
    world = obj.cluster.nodes * obj.cluster.tasks_per_node if obj.launcher.kind == "slurm" else 1
    try:
        steps = _steps(obj, params)  # type: ignore[arg-type]
        slurm = obj.launcher.kind == "slurm"  # its data may live on the compute nodes only
        notes = [n for s in steps for n in check_step(s, world, obj.data.generate, slurm)]
    except DataCheckError as err:
        raise ConfigError(f"data: {err}") from None
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
