"""Checks run on the submitting machine before anything queues.

A job that would fail on the cluster after waiting in the queue (a missing weights folder,
a `???` the recipe asks for, wandb online on nodes without network, a checkpoint written
by another world size) is refused here with the key and the path, or adjusted with a
message (wandb).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from setok_experiments.compose import ConfigError
from setok_experiments.paths import CONF_DIR
from setok_experiments.schema import ExperimentConfig
from setokim.train import TrainerConfig
from setokim.train.checkpoint import CheckpointError, read_trainer_state, resume_data_position

MISSING = "???"
# Keys whose value is a path a job reads, and what must be inside it.
_PATH_KEYS: dict[str, tuple[str, ...]] = {
    "pretrained_path": ("config.json",),
    "text_tokenizer_path": ("tokenizer_config.json",),
    "bert_path": ("config.json",),
    "unet_path": (),
    "vae_path": (),
    "init_tokenizer": (),
    "init_from": (),
    "tokenizer_path": (),
    "decoder_path": (),
    "mask_decoder_path": (),
}


class PreflightError(ConfigError):
    """A job would fail after queueing; the message names the key and the path."""


def _exp_chain(exp: str) -> list[Path]:
    """The recipe file and the recipes it builds on (exp defaults without a group)."""
    out: list[Path] = []
    todo = [exp]
    while todo:
        name = todo.pop()
        path = CONF_DIR / "exp" / f"{name}.yaml"
        if not path.is_file() or path in out:
            continue
        out.append(path)
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for entry in data.get("defaults") or []:
            if isinstance(entry, str) and entry != "_self_" and "/" not in entry:
                todo.append(entry)
    return out


def _missing_keys(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "defaults":
                continue
            yield from _missing_keys(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _missing_keys(value, f"{prefix}{i}.")
    elif node == MISSING:
        yield prefix.rstrip(".")


def _lookup(root: Any, dotted: str) -> Any:
    node = asdict(root) if is_dataclass(root) else root
    for part in dotted.split("."):
        if is_dataclass(node):
            node = asdict(node)
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def check_required(exp: str | None, cfg: ExperimentConfig) -> None:
    """Every `???` of the recipe is given. OmegaConf drops a `???` merged over a default
    (stage1_phase2's init_from composed to the stage group's null), so this reads the
    recipe files themselves."""
    if not exp:
        return
    for path in _exp_chain(exp):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for key in _missing_keys(data):
            value = _lookup(cfg, key)
            if value is None or value == MISSING:
                raise PreflightError(
                    f"{key}: must be given (+exp={exp} marks it ??? in "
                    f"{path.relative_to(CONF_DIR)}); e.g. {key}=PATH"
                )


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, str, Any, Any]]:
    """(dotted key, leaf key, value, enclosing mapping) for every leaf."""
    if is_dataclass(node):
        node = asdict(node)
    if isinstance(node, Mapping):
        for key, value in node.items():
            if isinstance(value, Mapping | list) or is_dataclass(value):
                yield from _walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", str(key), value, node
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{prefix}{i}.")


def _path_problem(path: Path, key: str, inside: tuple[str, ...]) -> str | None:
    """Why `path` (the value of `key`) cannot be read here, or None when it can."""
    if not path.exists():
        return (
            f"{key}: {path} does not exist (an unset SETOK_WEIGHTS / SETOK_DATA leaves a "
            "relative path); nothing downloads at run time"
        )
    if not os.access(path, os.R_OK):
        return f"{key}: {path} is not readable"
    for name in inside:
        if path.is_dir() and not (path / name).is_file():
            return f"{key}: {path} has no {name}"
    return None


def path_problems(cfg: ExperimentConfig) -> tuple[list[str], list[str]]:
    """(keys checked, one line per path that cannot be read here) for every path the stage
    params read.

    Shard dirs are checked where the stage does not generate its data
    (`generate_if_missing: false`); the top-level groups are only the recipe's sources
    for the stage params and are not read by the job themselves.
    """
    checked: list[str] = []
    problems: list[str] = []
    params = {"stage": {"params": cfg.stage.params}}
    for key, leaf, value, _parent in _walk(params):
        if not isinstance(value, str) or not value:
            continue
        if leaf in _PATH_KEYS:
            inside = _PATH_KEYS[leaf]
        elif leaf == "shard_dir" and _generates(params, key) is False:
            inside = ()
        else:
            continue
        checked.append(key)
        problem = _path_problem(Path(value), key, inside)
        if problem is not None:
            problems.append(problem)
    return checked, problems


def check_paths(cfg: ExperimentConfig) -> list[str]:
    """Every path the stage params read exists and is readable (PreflightError naming the
    first that is not); returns the keys checked."""
    checked, problems = path_problems(cfg)
    if problems:
        raise PreflightError(problems[0])
    return checked


EXPORT_CONFIG = "setokim_config.json"  # setokim.model.export.CONFIG_FILE
LLM_SHAPE = ("hidden_size", "num_hidden_layers")


def check_export_llm(cfg: ExperimentConfig) -> None:
    """A step that starts from a SeTokIM export (`init_from`) must hold the LLM the recipe
    names: the export's LLM config and `mllm.llm.pretrained_path`'s config.json agree on
    hidden size and depth (a 7B Stage II export under the 13B Stage III recipe would
    otherwise train the 7B model). Checked where both files can be read here."""
    path = cfg.mllm.llm.pretrained_path
    if not isinstance(path, str) or not (Path(path) / "config.json").is_file():
        return
    want = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    for key, leaf, value, _parent in _walk({"stage": {"params": cfg.stage.params}}):
        if leaf != "init_from" or not isinstance(value, str):
            continue
        export = Path(value) / EXPORT_CONFIG
        if not export.is_file():
            continue
        got = json.loads(export.read_text(encoding="utf-8")).get("llm_config") or {}
        for name in LLM_SHAPE:
            if name in want and got.get(name) != want[name]:
                raise PreflightError(
                    f"{key}: the export {value} holds an LLM with {name}={got.get(name)}, "
                    f"but the recipe's mllm.llm.pretrained_path ({path}) has {want[name]}: "
                    "start from a Stage II export of the same LLM"
                )


def _generates(root: Mapping[str, Any], key: str) -> bool | None:
    """`generate_if_missing` of the stage params holding `key` (None if none says)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        node = _lookup(root, ".".join(parts[:cut]))
        if isinstance(node, Mapping) and "generate_if_missing" in node:
            return bool(node["generate_if_missing"])
    return None


def check_resume_world_size(
    run_dir: Path, world_size: int, trainer: TrainerConfig | None = None
) -> None:
    """A run dir's checkpoints from another world size: refused before queueing, unless
    `trainer.world_size_change=reshard` with the global batch kept (the rule the job
    applies at resume: `setokim.train.checkpoint.resume_data_position`).

    Each rank's data position counts its own micro-batches, so another world size would
    read different samples and another schedule. Relaunch with the saved node count, or
    start a fresh run dir (another `run_root`, or `trainer.resume=false`).
    """
    trainer = trainer or TrainerConfig()
    for state_file in sorted(Path(run_dir).glob("**/checkpoints/step_*/trainer_state.json")):
        if state_file.parent.name.endswith((".tmp", ".rejected")):
            continue
        try:
            state = read_trainer_state(state_file.parent)
        except CheckpointError:
            continue
        try:
            resume_data_position(
                state, state_file.parent, world_size=world_size,
                micro_batch_size=trainer.micro_batch_size, grad_accum=trainer.grad_accum,
                policy=trainer.world_size_change,
            )  # fmt: skip
        except CheckpointError as err:
            raise PreflightError(f"cluster: {err}") from None


def wandb_override(cfg: ExperimentConfig) -> str | None:
    """`wandb.mode=offline` when wandb is online but the cluster's nodes have no network."""
    if cfg.wandb.mode == "online" and cfg.launcher.kind == "slurm" and cfg.cluster.offline:
        return "wandb.mode=offline"
    return None
