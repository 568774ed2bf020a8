"""Command line of experiments/launch.py (argparse; see `launch.py --help`)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from setok_experiments.table import format_table

if TYPE_CHECKING:
    from setok_experiments.executors import Outcome
    from setok_experiments.plan import Plan

# The launch machinery imports torch and the packages (tens of seconds on a busy machine):
# it is imported inside the commands, so `--help` answers at once.

DESCRIPTION = """\
Launch an experiment (Hydra configs in experiments/conf) as one job array.

  launch.py +exp=NAME [key=value ...] [--dry-run] [--wait] [--only NAME,...]
  launch.py status RUN_DIR_OR_EXP_DIR [--json]
  launch.py plan +exp=NAME [key=value ...]     (memory, FLOPs, wall time; preflight)
  launch.py report EXP_DIR                      (a paper analysis's table, from its rows)

Overrides use Hydra syntax (group=choice, a.b=value, +new=value, a=1,2 adds a sweep axis).
Config errors exit with status 2 before anything is queued. Run dirs are
<run_root>/<exp>/<hash of the overrides>/; launching the same thing again resumes there and
skips jobs that are still queued or running.
"""


def _rel(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def _launch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="+exp=NAME and Hydra overrides")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--wait", action="store_true", help="block and report the results")
    parser.add_argument(
        "--only", default=None, help="comma-separated job names of the sweep to launch"
    )
    return parser


def _status_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch.py status", description="Report an earlier launch."
    )
    parser.add_argument("path", type=Path, help="a run dir or an experiment dir")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    return parser


def _plan_table(plan: Plan, job_ids: dict[int, str] | None = None) -> str:
    rows = []
    for job in plan.jobs:
        if job.active_job is not None:
            job_id = f"{job.active_job} (still active: not resubmitted)"
        else:
            job_id = (job_ids or {}).get(job.index, "-")
        rows.append([job.index, job.name, job_id, _rel(job.run_dir), " ".join(job.identity)])
    return format_table(["#", "name", "job id", "run dir", "overrides"], rows)


def _outcome_table(plan: Plan, outcomes: dict[int, Outcome]) -> str:
    rows = []
    for job in plan.jobs:
        out = outcomes.get(job.index)
        if out is None:
            continue
        result = out.result or {}
        loss = result.get("last_loss")
        rows.append(
            [
                job.index,
                job.name,
                out.job_id,
                out.state,
                result.get("step", ""),
                f"{loss:.4f}" if isinstance(loss, float) else "",
                out.error or "",
            ]
        )
    return format_table(["#", "name", "job id", "state", "step", "loss", "error"], rows)


def launch(argv: Sequence[str]) -> int:
    args = _launch_parser().parse_intermixed_args(list(argv))
    from setok_experiments.compose import ConfigError
    from setok_experiments.executors import run_inline, submit_array, wait
    from setok_experiments.plan import build_plan, mark_active, split_exp
    from setok_experiments.record import new_launch_id
    from setok_experiments.rundir import source_state, write_run_metadata

    only = [s for s in args.only.split(",") if s] if args.only else None
    try:
        exp, overrides = split_exp(args.overrides)
        plan = build_plan(exp, overrides, only=only)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from setok_experiments.rundir import unwritable

    problem = unwritable(plan.exp_dir)
    if problem is not None:
        print(f"config error: run_root: run dirs cannot be created ({problem})", file=sys.stderr)
        return 2
    if plan.launcher.kind == "slurm":  # sized and checked before anything queues
        from setok_experiments.plan import check_before_queue

        try:
            plan, notes = check_before_queue(plan, exp, overrides, only=only, dry_run=args.dry_run)
        except ConfigError as err:
            print(f"refused before queueing: {err}", file=sys.stderr)
            return 2
        print("\n".join(notes))
    mark_active(plan)
    kind = plan.launcher.kind
    where = f" cluster={plan.cluster.name}" if kind == "slurm" else ""
    print(f"exp={plan.exp} launcher={kind}{where} jobs={len(plan.jobs)} dir={_rel(plan.exp_dir)}")
    if args.dry_run:
        print(_plan_table(plan))
        print("dry run: nothing written, nothing queued")
        return 0

    to_run = plan.to_run
    if not to_run:
        print(_plan_table(plan))
        print("nothing to launch: every job is still queued or running")
        return 0
    source = source_state()
    command = ["experiments/launch.py", *argv]
    for job in to_run:
        changed = write_run_metadata(
            job.run_dir,
            config_yaml=job.config_yaml,
            exp=plan.exp,
            name=job.name,
            overrides=job.overrides,
            identity=job.identity,
            source=source,
            command=command,
            launcher=kind,
        )
        if changed:
            print(
                f"warning: {_rel(job.run_dir)}: config changed since its last launch",
                file=sys.stderr,
            )

    launch_id = new_launch_id()
    specs = [job.spec(plan.exp) for job in to_run]
    folder = plan.exp_dir / "submitit"
    if kind == "inline":
        job_ids = {job.index: f"inline-{launch_id}-{job.index}" for job in to_run}
        _record(plan, launch_id, kind, command, job_ids, None)
        print(_plan_table(plan, job_ids), flush=True)
        submissions = run_inline(specs, [job_ids[j.index] for j in to_run])
        report_job = _report(plan, kind, submissions, folder)
    else:
        submissions = submit_array(
            kind, specs, folder, plan.launcher, plan.cluster, job_name=f"setok-{plan.exp}"
        )
        job_ids = {job.index: sub.job_id for job, sub in zip(to_run, submissions, strict=True)}
        _record(plan, launch_id, kind, command, job_ids, folder)
        print(_plan_table(plan, job_ids))
        report_job = _report(plan, kind, submissions, folder)

    if kind == "inline" or args.wait:
        if kind != "inline":
            print(
                f"waiting up to {plan.launcher.wait_timeout_min:g} min for {len(submissions)} job(s)"
            )
        outcomes = wait(
            submissions, timeout_s=plan.launcher.wait_timeout_min * 60, poll_s=plan.launcher.poll_s
        )
        by_index = {job.index: out for job, out in zip(to_run, outcomes, strict=True)}
        print(_outcome_table(plan, by_index))
        if report_job is not None:
            print(f"report: {report_job.result()}")
        bad = [o for o in outcomes if o.state != "COMPLETED"]
        return 1 if bad else 0
    print(f"submitted; follow with: launch.py status {_rel(plan.exp_dir)}")
    return 0


def _report(plan: Plan, kind: str, submissions: list[Any], folder: Path) -> Any:
    """Paper-analysis arrays (study rows) end with their report (setok_experiments.report)."""
    from setok_experiments.report import submit_report, wants_report

    return submit_report(plan, kind, submissions, folder) if wants_report(plan) else None


def _record(
    plan: Plan,
    launch_id: str,
    kind: str,
    command: list[str],
    job_ids: dict[int, str],
    folder: Path | None,
) -> None:
    from setok_experiments.record import append_launch

    host = socket.gethostname()
    jobs: list[dict[str, Any]] = []
    for job in plan.jobs:
        jobs.append(
            {
                "index": job.index,
                "name": job.name,
                "job_id": job_ids.get(job.index),
                "skipped_active": job.active_job,
                "run_dir": str(job.run_dir),
                "overrides": list(job.identity),
                "host": host,
            }
        )
    append_launch(
        plan.exp_dir,
        {
            "launch_id": launch_id,
            "time": time.time(),
            "launcher": kind,
            "cluster": plan.cluster.name if kind == "slurm" else None,
            "command": command,
            "overrides": plan.overrides,
            "submitit_folder": str(folder) if folder else None,
            "jobs": jobs,
        },
    )


def status(argv: Sequence[str]) -> int:
    args = _status_parser().parse_args(list(argv))
    from setok_experiments.status import collect

    try:
        exp_dir, rows = collect(args.path)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return 0
    print(f"experiment dir: {_rel(exp_dir)}")
    table_rows = []
    for r in rows:
        loss = r["loss"]
        table_rows.append(
            [
                r["index"],
                r["name"],
                r["job_id"],
                r["scheduler_state"],
                r["run_state"],
                r["attempts"],
                r["checkpoint_step"] if r["checkpoint_step"] is not None else "-",
                f"{loss:.4f}" if isinstance(loss, float) else "-",
                _rel(Path(r["run_dir"])),
            ]
        )
    headers = [
        "#",
        "name",
        "job id",
        "scheduler",
        "run",
        "attempts",
        "ckpt step",
        "loss",
        "run dir",
    ]
    print(format_table(headers, table_rows))
    for r in rows:
        if r["error"]:
            where = f" (traceback: {_rel(Path(r['error_log']))})" if r.get("error_log") else ""
            print(f"[{r['index']}] {r['name']}: {r['error']}{where}")
    return 0


def plan_command(argv: Sequence[str]) -> int:
    """`launch.py plan +exp=...`: the resource plan and the preflight, nothing queued."""
    parser = argparse.ArgumentParser(
        prog="launch.py plan",
        description="Hardware, batch, steps, memory per GPU, FLOPs, wall time and requeues of "
        "an experiment (models built on the meta device), then the checks a launch runs "
        "before queueing. Exit status 2 when the launch would be refused.",
    )
    parser.add_argument("overrides", nargs="*", help="+exp=NAME and Hydra overrides")
    parser.add_argument(
        "--utilisation", type=float, default=None, help="model FLOPs utilisation (default 0.4)"
    )
    args = parser.parse_intermixed_args(list(argv))
    from setok_experiments.compose import ConfigError
    from setok_experiments.plan import build_plan, check_before_queue, split_exp

    try:
        exp, overrides = split_exp(args.overrides)
        plan = build_plan(exp, overrides)
        plan, notes = check_before_queue(plan, exp, overrides, utilisation=args.utilisation)
    except ConfigError as err:
        print(f"refused before queueing: {err}", file=sys.stderr)
        return 2
    print("\n".join(notes))
    print("preflight: paths readable, required values given; would queue")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "status":
        return status(argv[1:])
    if argv and argv[0] == "plan":
        return plan_command(argv[1:])
    if argv and argv[0] == "report":
        from setok_experiments.report import main as report_main

        return report_main(argv[1:])
    return launch(argv)
