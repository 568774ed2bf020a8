"""Run one stage without Hydra: `python -m setokim.train.cli toy runs/x --set max_steps=50`.

Works under torchrun / srun as well (the loop reads the distributed layout from the
environment). Values after --set / --param are parsed as JSON when they parse, else kept
as strings. Rank 0 prints the TrainResult as one JSON line at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from typing import Any

from setokim.stages import available_stages, build_stage
from setokim.train.config import TrainerConfig, WandbConfig
from setokim.train.loop import train


def _parse_pairs(pairs: list[str], flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in pairs:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag}: expected key=value, got {item!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", help=f"registered stage: {', '.join(available_stages())}")
    parser.add_argument("run_dir", help="checkpoints, metrics and logs go here; resumes from it")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="TrainerConfig fields, e.g. max_steps=100 lr=3e-4")  # fmt: skip
    parser.add_argument("--param", nargs="*", default=[], metavar="KEY=VALUE",
                        help="stage config entries (dotted keys nest), e.g. hidden=64")  # fmt: skip
    parser.add_argument(
        "--wandb-mode", default="disabled", choices=["offline", "online", "disabled"]
    )
    parser.add_argument("--preempt-at-step", type=int, default=None,
                        help="testing: rank 0 sends itself SIGTERM after this step")  # fmt: skip
    args = parser.parse_args(argv)

    try:
        cfg = TrainerConfig(**_parse_pairs(args.set, "--set"))
    except TypeError as err:
        raise SystemExit(f"--set: {err}") from None
    stage = build_stage(args.stage, _parse_pairs(args.param, "--param"))
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))

    def on_step(step: int, loss: float) -> None:
        if args.preempt_at_step is not None and step == args.preempt_at_step and rank == 0:
            signal.raise_signal(signal.SIGTERM)

    result = train(
        stage, cfg, args.run_dir, wandb=WandbConfig(mode=args.wandb_mode), on_step=on_step
    )
    if rank == 0:
        summary = dataclasses.asdict(result)
        summary["checkpoint"] = str(result.checkpoint) if result.checkpoint else None
        summary.pop("history")
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
