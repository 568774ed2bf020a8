"""The root experiment schema: what `experiments/launch.py` composes and validates.

`ExperimentConfig` composes the packages' own config dataclasses with the launcher's own
(`StageConfig`, `LauncherConfig`, `ClusterConfig`: only the launcher reads them). Registered in Hydra's
ConfigStore as `setok_experiment` (the first entry of `experiments/conf/config.yaml`'s
defaults), so a typo in an override fails at compose time with the key's name, and
`OmegaConf.to_object` (which runs every `__post_init__`) rejects bad values before anything
is queued.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from setok_decoders.config import DecodersConfig
from setok_tokenizer.config import SeTokConfig, require, require_choice, require_min
from setokim.data.config import DataConfig
from setokim.model.config import SeTokIMConfig
from setokim.train.config import TrainerConfig, WandbConfig

SCHEMA_NAME = "setok_experiment"
LAUNCHER_KINDS = ("inline", "local", "slurm")


def _fail(key: str, message: str) -> None:
    raise ValueError(f"{key}: {message}")


@dataclass
class StageConfig:
    """Which objective to train: `setokim.stages.build_stage(name, params)`.

    `params` is handed to the stage as a mapping; stage files interpolate the parts of the
    experiment they consume (e.g. `tokenizer: ${tokenizer}`), and the stage builds its typed
    config from it (unknown keys and bad values fail naming them).
    """

    name: str = "toy"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(bool(self.name), self, "name", "must be a registered stage name, got ''")


@dataclass
class LauncherConfig:
    """Where jobs run: in this process, as local subprocesses, or as a SLURM job array.

    timeout_min: wall limit of a local job (SLURM jobs take `cluster.time_min`).
    wait_timeout_min: how long `--wait` blocks before reporting what is still running.
    array_parallelism: local jobs running at once (null: the machine's CPU cores); the rest
        wait in line (SLURM arrays take `cluster.array_parallelism`).
    """

    kind: str = "inline"
    timeout_min: int = 60
    wait_timeout_min: float = 120.0
    poll_s: float = 2.0
    array_parallelism: int | None = None

    def __post_init__(self) -> None:
        require_choice(self, "kind", LAUNCHER_KINDS)
        require_min(self, 1, "timeout_min", "array_parallelism")
        require_min(self, 0, "wait_timeout_min", "poll_s", strict=True)


@dataclass
class ClusterConfig:
    """A SLURM cluster profile (files under `slurm/profiles/cluster/`); used by launcher=slurm.

    One task per GPU: a job gets `nodes * max(gpus_per_node, 1)` tasks. `mem_gb` is per node
    (None: the partition's default). `setup` lines run in the sbatch script before the job
    (module loads, environment variables). `additional` holds any other sbatch option.
    gpu_mem_gb / gpu_tflops: one GPU's memory and dense bf16 peak, for the launch plan's
    memory check and wall-time estimate (None: not checked / not estimated).
    offline: compute nodes have no network (wandb online is switched to offline).
    """

    name: str = "dev"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None
    time_min: int = 60
    constraint: str | None = None
    setup: list[str] = field(default_factory=list)
    array_parallelism: int = 64
    signal_delay_s: int = 90
    max_num_timeout: int = 3
    additional: dict[str, Any] = field(default_factory=dict)
    gpu_mem_gb: float | None = None
    gpu_tflops: float | None = None
    offline: bool = False

    def __post_init__(self) -> None:
        require_min(self, 0, "gpu_mem_gb", "gpu_tflops", "mem_gb", strict=True)  # or null
        require_min(self, 1, "nodes", "cpus_per_task", "time_min", "array_parallelism")
        require_min(self, 0, "gpus_per_node", "signal_delay_s", "max_num_timeout")

    @property
    def tasks_per_node(self) -> int:
        return max(self.gpus_per_node, 1)


@dataclass
class ExperimentConfig:
    """One experiment: the model parts, the data, the objective, the trainer and the launch.

    decoder / mllm: what the Stage I and SeTokIM stage files hand their stages (`${decoder}`,
        `${mllm}`); the objectives that do not read them keep the defaults, and decoder
        widths left None come from the tokenizer.
    sweep: override key (or config group) -> list of values; the launcher runs the grid.
    variants: name -> list of Hydra override strings; crossed with the grid.
    """

    name: str = "default"
    description: str = ""
    run_root: str = "runs"
    tokenizer: SeTokConfig = field(default_factory=SeTokConfig)
    decoder: DecodersConfig = field(default_factory=DecodersConfig)
    mllm: SeTokIMConfig = field(default_factory=SeTokIMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sweep: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, Any] = field(default_factory=dict)
    # What an eval experiment evaluates (`+exp=eval tasks=[...] checkpoint=DIR`): suite
    # task names, a SeTokIM export, and the root of their documents (data/eval/*.jsonl).
    tasks: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    eval_data: str | None = None

    def __post_init__(self) -> None:
        if not self.run_root:
            _fail("run_root", "must be a directory path, got an empty string")
        for key in ("tasks", "checkpoint", "eval_data"):
            if getattr(self, key) and self.stage.name != "eval":
                _fail(
                    key, f"only eval experiments read it (+exp=eval), stage is {self.stage.name!r}"
                )
        for key, values in self.sweep.items():
            if not isinstance(values, list | tuple) or not values:
                _fail(f"sweep.{key}", f"must be a non-empty list of values, got {values!r}")
        for name, overrides in self.variants.items():
            if not isinstance(overrides, list | tuple):
                _fail(
                    f"variants.{name}", f"must be a list of 'key=value' strings, got {overrides!r}"
                )
            for item in overrides:
                if not isinstance(item, str) or "=" not in item:
                    _fail(f"variants.{name}", f"entries must be 'key=value' strings, got {item!r}")


def register_configs() -> None:
    """Put the root schema into Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=ExperimentConfig)
