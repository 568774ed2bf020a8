"""Evaluate a model (through an adapter) on suite tasks; resumable, shardable over ranks.

    python eval_suite/run.py --adapter setokim --adapter-arg export=RUN/stage3/export \
        --tasks vqav2_val pope_coco_random --data-root DATA_ROOT --out runs/x/eval
    python eval_suite/run.py --adapter replay:preds.jsonl --tasks vqav2_val pope --out runs/x/eval
    python eval_suite/run.py --adapter pkg.module:make_adapter --run-dir runs/x --tasks all

`--adapter` is a registered name (`ADAPTERS`: setokim = a SeTokIM export, given as
`--adapter-arg export=DIR`), `replay:PATH` (score saved predictions) or `module:factory`, a
callable returning an adapter; a factory is called with `run_dir=` (when given) and every
`--adapter-arg key=value`.
Rank and world size come from --rank/--world-size, else RANK/WORLD_SIZE, else SLURM_PROCID/
SLURM_NTASKS. Results go to OUT/results.json (OUT defaults to RUN_DIR/eval).
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

from setok_eval import ReplayAdapter, load_tasks, run_eval
from setok_eval.metrics.image import load_feature_extractor

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
# registered adapter names -> their factory (module:callable)
ADAPTERS = {"setokim": "setokim.model.eval_adapter:from_export"}


def make_adapter(spec: str, run_dir: str | None, extra: dict[str, Any]) -> Any:
    """Build the adapter named by `spec` (a registered name, replay:PATH or module:factory)."""
    if spec.startswith("replay:"):
        return ReplayAdapter(spec.removeprefix("replay:"))
    spec = ADAPTERS.get(spec, spec)
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise SystemExit(
            f"--adapter must be one of {sorted(ADAPTERS)}, replay:PATH or module:factory, "
            f"got {spec!r}"
        )
    factory = getattr(importlib.import_module(module_name), attr)
    kwargs = dict(extra)
    if run_dir is not None:
        kwargs["run_dir"] = run_dir
    return factory(**kwargs)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{flag} expects key=value, got {item!r}")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--adapter", required=True, help=f"{'|'.join(ADAPTERS)}, replay:PATH or module:factory"
    )
    parser.add_argument(
        "--adapter-arg", action="append", default=[], help="key=value for the factory"
    )
    parser.add_argument("--tasks", nargs="+", default=["all"], help="task names, or 'all'")
    parser.add_argument("--tasks-dir", default=str(TASKS_DIR), help="folder of task YAML files")
    parser.add_argument("--run-dir", default=None, help="run folder; results go to RUN_DIR/eval")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/eval)")
    parser.add_argument("--data-root", default=None, help="root of relative task data paths")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--world-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="first N documents per task")
    parser.add_argument(
        "--extractor",
        action="append",
        default=[],
        help="NAME=PATH feature model for clip/dino/inception metrics (.pt or .npz)",
    )
    parser.add_argument("--llm-config", default=None, help="JSON file with the LLM config (FLOPs)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.out is None and args.run_dir is None:
        parser.error("give --out or --run-dir")
    out = Path(args.out) if args.out else Path(args.run_dir) / "eval"
    names = None if args.tasks == ["all"] else args.tasks
    tasks = load_tasks(args.tasks_dir, names)
    extractors = {
        name: load_feature_extractor(path, kind=name)
        for name, path in _pairs(args.extractor, "--extractor").items()
    }
    llm_config = json.loads(Path(args.llm_config).read_text()) if args.llm_config else None
    adapter = make_adapter(args.adapter, args.run_dir, _pairs(args.adapter_arg, "--adapter-arg"))
    results = run_eval(
        adapter,
        tasks,
        out,
        rank=args.rank,
        world_size=args.world_size,
        data_root=args.data_root,
        batch_size=args.batch_size,
        limit=args.limit,
        extractors=extractors,
        llm_config=llm_config,
        n_resamples=args.resamples,
        seed=args.seed,
        progress=not args.no_progress,
    )
    if results is not None:
        for name, entry in results["tasks"].items():
            m = entry["metrics"][entry["primary"]]
            print(
                f"{name}: {entry['primary']} = {m['value']:.4f} (n={entry['n']}, ci95={m['ci95']})"
            )
        print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
