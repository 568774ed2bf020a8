"""Compose an experiment with Hydra's compose API and validate it against the schema.

Everything that can be wrong with a config fails here, on the submitting machine, with the
key's name: unknown keys and wrong types (structured schema), bad values (the dataclasses'
`__post_init__`), unknown stage names (the stage registry).
"""

from __future__ import annotations

from collections.abc import Sequence

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from setok_experiments.overrides import format_value
from setok_experiments.paths import CLUSTER_PROFILES_DIR, CONF_DIR
from setok_experiments.schema import ExperimentConfig, register_configs


class ConfigError(ValueError):
    """The experiment config is invalid; the message names the offending key."""


def _searchpath_override() -> str:
    return "hydra.searchpath=[" + format_value(f"file://{CLUSTER_PROFILES_DIR}") + "]"


def compose_experiment(exp: str | None, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose `config.yaml` + `exp/<exp>.yaml` + overrides (unresolved, hydra node removed)."""
    register_configs()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    full = ([f"+exp={exp}"] if exp else []) + list(overrides) + [_searchpath_override()]
    try:
        with initialize_config_dir(
            version_base="1.3", config_dir=str(CONF_DIR), job_name="setok_launch"
        ):
            cfg = compose(config_name="config", overrides=full)
    except (HydraException, OmegaConfBaseException, ValueError, yaml.YAMLError) as err:
        raise ConfigError(_describe(err)) from None
    return cfg


def validate(cfg: DictConfig) -> ExperimentConfig:
    """Resolve and instantiate the schema dataclasses (runs every `__post_init__`)."""
    try:
        obj = OmegaConf.to_object(cfg)
    except (OmegaConfBaseException, ValueError, TypeError) as err:
        raise ConfigError(_with_key_path(cfg, _describe(err))) from None
    if not isinstance(obj, ExperimentConfig):
        raise ConfigError(f"config root: expected ExperimentConfig, got {type(obj).__name__}")
    from setokim.stages import available_stages, build_stage

    if obj.stage.name not in available_stages():
        raise ConfigError(
            f"stage.name: unknown stage {obj.stage.name!r}; available: {available_stages()}"
        )
    # Stage constructors only check their config (models are built later, in the job), so
    # building one here rejects bad stage params (and init paths that do not exist) before
    # anything is queued.
    params = OmegaConf.to_container(cfg.stage.params, resolve=True)
    try:
        build_stage(obj.stage.name, params)  # type: ignore[arg-type]
    except (ValueError, TypeError, KeyError, FileNotFoundError) as err:
        raise ConfigError(f"stage.params ({obj.stage.name}): {err}") from None
    return obj


def load_experiment(exp: str | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """compose + validate in one call (tests, the job side)."""
    return validate(compose_experiment(exp, overrides))


def from_yaml(text: str) -> ExperimentConfig:
    """Rebuild the typed config from a resolved YAML dump (what a job receives)."""
    register_configs()
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.create(text))
    except OmegaConfBaseException as err:
        raise ConfigError(_describe(err)) from None
    return validate(merged)  # type: ignore[arg-type]


def _failing_node(cfg: DictConfig, path: str = "") -> tuple[str, type | None]:
    """The deepest structured node under `cfg` that does not build, and its dataclass."""
    for key in cfg:
        node = cfg._get_node(key)  # type: ignore[union-attr]
        if isinstance(node, DictConfig) and OmegaConf.get_type(node) not in (dict, None):
            try:
                OmegaConf.to_object(node)
            except Exception:  # noqa: BLE001 - any failure: look inside this node
                return _failing_node(node, f"{path}{key}.")
    return path, OmegaConf.get_type(cfg)


def _with_key_path(cfg: DictConfig, message: str) -> str:
    """A dataclass check names "ClassName.field"; give the field's path in the experiment
    instead ("tokenizer.clustering.mechanism: ...")."""
    path, cls = _failing_node(cfg)
    prefix = f"{cls.__name__}." if cls is not None else ""
    if path and prefix and message.startswith(prefix):
        return path + message[len(prefix) :]
    return message


def _describe(err: BaseException) -> str:
    # OmegaConf errors carry the full key; surface it first, then the message chain.
    parts: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        full_key = getattr(cur, "full_key", None)
        text = str(cur).strip()
        if full_key and f"full_key: {full_key}" not in text:
            text = f"{full_key}: {text}"
        if text and text not in parts:
            parts.append(text)
        cur = cur.__cause__ or cur.__context__
    return "\n".join(parts) or type(err).__name__
