"""The registry's "eval" entry: evaluate a SeTokIM on any suite tasks as a job.

Not a `train.Stage`: the launcher's job calls `run(run_dir)` instead of `train(...)`, so an
evaluation is planned, launched, requeued and reported like any training run. Steps:

1. with a `shard_dir`, rank 0 exports its `split` as eval documents into `data_root`
   (default `run_dir/eval_data`) unless an export of the same data version is there: the
   requested shapes_* tasks, plus `export` ({shard task: suite task}, e.g. {vqa:
   vqav2_val} for a converted VQAv2 split). A tiny Shapes World is generated into a missing
   `shard_dir` only with `generate_if_missing` (the Shapes World recipes). Without a
   `shard_dir`, `data_root` must hold the documents already (tools/export_eval_data.py, the
   benchmark exporters in tools/data/eval_*.py). Every task's document file is checked
   before the model loads;
2. the model, on the rank's device (cuda:LOCAL_RANK, the CPU without CUDA; every rank holds
   the whole model and predicts its share of the documents): `checkpoint` (a
   `SeTokIM.save_pretrained` dir, read straight onto the device) when given, else, with
   `tiny_random: true`, a seeded random tiny SeTokIM (smoke tests);
3. `setok_eval.run_eval` into `run_dir/eval` (results.json there). Every prediction is cached
   as it is made, so a relaunch after a kill or preemption only predicts what is missing.

SIGTERM / SIGUSR1 during the eval stop it (the cache keeps what was done) and `run` returns
with `preempted=True`, as the trainer does. setok_eval is imported only inside `run`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from setok_tokenizer.config import from_dict
from setokim.data.shapes_world import World
from setokim.stages import JobResult
from setokim.stages.common import GenerateFields

if TYPE_CHECKING:
    import torch

EVAL_SUBDIR = "eval"
DATA_SUBDIR = "eval_data"
# Every Shapes World task but shapes_t2i, whose FID needs an Inception model from a local file
# (add it to `tasks` with `extractors: {inception: PATH}`).
SHAPES_TASKS: tuple[str, ...] = (
    "shapes_caption",
    "shapes_vqa",
    "shapes_pope",
    "shapes_rec",
    "shapes_reasonseg",
    "shapes_edit",
    "shapes_tokens",
)


_MAPS = {"generation": "settings mappings", "export": "suite task names", "extractors": "paths"}


@dataclass
class EvalStageConfig(GenerateFields):
    """`stage.params` of the eval stage (unknown keys are rejected by `build`).

    checkpoint wins over tiny_random (so one override turns the smoke exp into a real eval).
    limit: documents per task (the first N by id); export_limit: images of `split` exported.
    generation: per-task overrides of the task's generation settings, e.g.
    {shapes_edit: {num_inference_steps: 10}} (they enter the prediction cache key).
    extractors: feature models by metric need (inception, clip, dino) -> local .pt/.npz path.
    tasks_dir: the suite's task YAMLs; None finds `eval_suite/tasks` from the working
    directory or the repository this package lives in.
    """

    checkpoint: str | None = None
    tiny_random: bool = False
    seed: int = 0
    tasks: list[str] = field(default_factory=lambda: list(SHAPES_TASKS))
    limit: int | None = None
    shard_dir: str | None = "data/shapes_world"
    export: dict[str, str] = field(default_factory=dict)
    split: str = "test"
    export_limit: int | None = None
    data_root: str | None = None
    tasks_dir: str | None = None
    batch_size: int = 8
    n_resamples: int = 1000
    generation: dict[str, dict[str, Any]] = field(default_factory=dict)
    extractors: dict[str, str] = field(default_factory=dict)
    generate_if_missing: bool = False  # GenerateFields, with an eval's defaults
    generate_train: int = 64
    world: World = field(default_factory=World)  # the Shapes World generated when missing
    wait_timeout_s: float = 3600.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.checkpoint is None and not self.tiny_random:
            raise ValueError(
                "eval: checkpoint (a SeTokIM export dir) is null and tiny_random false"
            )
        if self.checkpoint is not None and not Path(self.checkpoint).is_dir():
            raise ValueError(
                f"eval: checkpoint {self.checkpoint!r} is not a directory (a SeTokIM export dir)"
            )
        if isinstance(self.tasks, str) or not isinstance(self.tasks, Sequence) or not self.tasks:
            raise ValueError(f"eval: tasks must be a non-empty list of names, got {self.tasks!r}")
        for key in ("generation", "export", "extractors"):
            value = getattr(self, key)
            if not isinstance(value, Mapping) or (
                key == "generation" and not all(isinstance(v, Mapping) for v in value.values())
            ):
                raise ValueError(f"eval: {key} must map names to {_MAPS[key]}, got {value!r}")
        from setokim.data.eval_export import EVAL_TASKS

        bad = sorted(set(self.export) - set(EVAL_TASKS))
        if bad:
            raise ValueError(f"eval: export: {bad} are not shard tasks {list(EVAL_TASKS)}")
        if self.shard_dir is None and self.data_root is None:
            raise ValueError("eval: give shard_dir (exported first) or data_root (documents)")
        for name in ("limit", "export_limit"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"eval: {name} must be >= 1 or null, got {value}")
        if self.batch_size < 1:
            raise ValueError(f"eval: batch_size must be >= 1, got {self.batch_size}")
        # Settings for tasks not selected are ignored (an exp's defaults survive a tasks override).

    def export_names(self) -> dict[str, str]:
        """{shard task: suite task} exported from `shard_dir`: requested shapes_* + `export`."""
        from setokim.data.eval_export import EVAL_TASKS, task_name

        names = {t: task_name(t) for t in EVAL_TASKS if task_name(t) in self.tasks}
        return names | dict(self.export)


@dataclass
class EvalResult(JobResult):
    """What the launcher records of an eval, and where it wrote its results.

    step: documents scored over all tasks (an eval has no loss).
    """

    seconds: float = 0.0
    results_path: Path | None = None
    primary: dict[str, float] = field(default_factory=dict)  # task -> primary metric value


class _Interrupted(Exception):
    """Raised from the signal handler to leave run_eval; the cache keeps finished work."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


class _StopOnSignal:
    """While evaluating, SIGTERM / SIGUSR1 raise `_Interrupted` (main thread only)."""

    def __init__(self) -> None:
        self._previous: dict[signal.Signals, Any] = {}

    @staticmethod
    def _handle(signum: int, frame: FrameType | None) -> None:
        del frame
        raise _Interrupted(signum)

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def find_tasks_dir(tasks_dir: str | os.PathLike[str] | None) -> Path:
    """The suite's task directory: as given, else `eval_suite/tasks` above cwd or this file."""
    if tasks_dir is not None:
        path = Path(tasks_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"tasks_dir: {path} is not a directory")
        return path
    for base in (Path.cwd(), *Path(__file__).resolve().parents):
        candidate = base / "eval_suite" / "tasks"
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("tasks_dir: no eval_suite/tasks found; set stage.params.tasks_dir")


def _export_version(data_root: Path) -> str | None:
    from setokim.data.eval_export import read_export

    export = read_export(data_root)
    return None if export is None else str(export["data_version"])


def prepare_eval_data(cfg: EvalStageConfig, data_root: Path, rank: int) -> None:
    """Rank 0 generates (if allowed) and exports the eval documents; other ranks wait."""
    from setokim.data.eval_export import export_eval_data, export_version
    from setokim.data.shards import dataset_version, read_manifest
    from setokim.stages.common import ensure_dataset

    if cfg.shard_dir is None or not cfg.export_names():
        return  # documents are in data_root already (checked by suite_tasks)
    if rank != 0:
        start = time.monotonic()
        while _export_version(data_root) is None:
            if time.monotonic() - start > cfg.wait_timeout_s:
                raise TimeoutError(f"rank {rank}: rank 0 did not export eval data to {data_root}")
            time.sleep(1.0)
        return
    shard_dir = Path(cfg.shard_dir)
    if not (shard_dir / "manifest.json").is_file():
        if not cfg.generate_if_missing:
            raise FileNotFoundError(
                f"shard_dir: no manifest.json in {shard_dir} (convert data there, or pass "
                "data.generate=true for a generated Shapes World)"
            )
        ensure_dataset(
            shard_dir,
            train=cfg.generate_train,
            image_size=cfg.generate_image_size,
            seed=cfg.generate_seed,
            world=cfg.world,
        )
    source = str(read_manifest(shard_dir).get("info", {}).get("source", "shapes_world"))
    wanted = export_version(dataset_version(shard_dir), cfg.split, cfg.export_limit, source)
    found = _export_version(data_root)
    if found == wanted:
        return
    if found is not None:
        # Cached predictions are keyed by document id, not data version: never mix exports.
        raise ValueError(
            f"data_root: {data_root} holds an export of {found!r}, this run wants {wanted!r}; "
            "use a new run dir or data_root"
        )
    export_eval_data(
        shard_dir, cfg.split, data_root, limit=cfg.export_limit, names=cfg.export_names()
    )


def build_adapter(cfg: EvalStageConfig, device: torch.device) -> Any:
    """The SeTokIM adapter on `device`: an exported checkpoint (read straight onto it, no
    random LLM), or a seeded random tiny model."""
    from setokim.model.eval_adapter import SeTokIMAdapter

    if cfg.checkpoint is not None:
        path = Path(cfg.checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint: {path} is not a SeTokIM export directory")
        return SeTokIMAdapter.from_pretrained(path, device=device, batch_size=cfg.batch_size)
    import torch

    from setokim.model.build import build_tiny_setokim
    from setokim.model.config import SeTokIMConfig

    torch.manual_seed(cfg.seed)
    model = build_tiny_setokim(SeTokIMConfig(seed=cfg.seed))
    return SeTokIMAdapter(model.to(device), batch_size=cfg.batch_size)


@dataclass
class EvalStage:
    """Evaluate one model on suite tasks in `run_dir/eval` (see module doc)."""

    cfg: EvalStageConfig

    def run(self, run_dir: str | os.PathLike[str], wandb: Any = None) -> EvalResult:
        del wandb  # metrics go to results.json; the leaderboard reads them from there
        from setok_eval.runner import resolve_rank, run_eval
        from setokim.data.eval_export import suite_tasks

        cfg = self.cfg
        root = Path(run_dir)
        rank, world_size = resolve_rank()
        data_root = Path(cfg.data_root) if cfg.data_root else root / DATA_SUBDIR
        prepare_eval_data(cfg, data_root, rank)
        tasks = suite_tasks(find_tasks_dir(cfg.tasks_dir), data_root, cfg.tasks)
        tasks = [
            replace(t, generation={**t.generation, **cfg.generation[t.name]})
            if t.name in cfg.generation
            else t
            for t in tasks
        ]
        from setok_eval.metrics.image import load_feature_extractor

        extractors = {k: load_feature_extractor(p, kind=k) for k, p in cfg.extractors.items()}
        from setokim.train.distributed import detect_env, select_device

        # data-parallel: every rank holds the whole model on its own GPU (cuda:local_rank),
        # the CPU where there is no CUDA, as the trainer places its ranks
        adapter = build_adapter(cfg, select_device(detect_env()))
        start = time.perf_counter()
        try:
            with _StopOnSignal():
                results = run_eval(
                    adapter, tasks, root / EVAL_SUBDIR, rank=rank, world_size=world_size,
                    data_root=data_root, batch_size=cfg.batch_size, limit=cfg.limit,
                    extractors=extractors,
                    n_resamples=cfg.n_resamples, seed=cfg.seed,
                    wait_timeout_s=cfg.wait_timeout_s, progress=cfg.progress,
                )  # fmt: skip
        except _Interrupted as stop:
            print(f"eval: stopped by signal {stop.signum}; a relaunch resumes from the cache")
            seconds = time.perf_counter() - start
            return EvalResult(step=0, preempted=True, signal=stop.signum, seconds=seconds)
        seconds = time.perf_counter() - start
        if results is None:  # ranks > 0: rank 0 scores and writes results.json
            return EvalResult(step=0, seconds=seconds)
        entries = results["tasks"]
        primary = {
            name: float(e["metrics"][e["primary"]]["value"])
            for name, e in entries.items()
            if e["metrics"].get(e["primary"], {}).get("value") is not None
        }
        n = sum(int(e["n"]) for e in entries.values())
        out = EvalResult(step=n, seconds=seconds)
        out.results_path = root / EVAL_SUBDIR / "results.json"
        out.primary = primary
        for name, value in primary.items():
            print(f"eval: {name} {entries[name]['primary']} = {value:.4g} (n={entries[name]['n']})")
        return out


def build(cfg: Mapping[str, Any]) -> EvalStage:
    """Registry entry: checks the params (cheap: nothing is loaded until `run`)."""
    return EvalStage(from_dict(EvalStageConfig, cfg, where="eval"))
