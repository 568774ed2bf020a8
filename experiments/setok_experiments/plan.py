"""From `+exp=NAME overrides` to a validated list of jobs, each with its run dir.

Every job's config is composed and validated here, so nothing is queued unless all are valid.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from setok_experiments.compose import ConfigError, compose_experiment, validate
from setok_experiments.data_check import check_data
from setok_experiments.job import JobSpec, read_status
from setok_experiments.overrides import (
    OverrideError,
    identity_overrides,
    parse_overrides,
)
from setok_experiments.record import latest_jobs, read_record
from setok_experiments.rundir import exp_dir_for, run_dir_for
from setok_experiments.scheduler import ACTIVE_SLURM_STATES, pid_alive, slurm_states
from setok_experiments.schema import ClusterConfig, ExperimentConfig, LauncherConfig
from setok_experiments.sweep import expand_sweep, swept_keys


@dataclass
class PlannedJob:
    """One run of the experiment. `active_job` is set when a job for it is still live."""

    index: int
    name: str
    overrides: tuple[str, ...]
    identity: tuple[str, ...]
    run_dir: Path
    config: ExperimentConfig
    config_yaml: str
    active_job: str | None = None

    def spec(self, exp: str) -> JobSpec:
        return JobSpec(
            exp=exp,
            index=self.index,
            name=self.name,
            run_dir=str(self.run_dir),
            config_yaml=self.config_yaml,
            overrides=list(self.identity),
        )


@dataclass
class Plan:
    exp: str
    exp_dir: Path
    overrides: list[str]
    launcher: LauncherConfig
    cluster: ClusterConfig
    jobs: list[PlannedJob] = field(default_factory=list)

    @property
    def to_run(self) -> list[PlannedJob]:
        return [j for j in self.jobs if j.active_job is None]


def split_exp(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Pull `+exp=NAME` (or `exp=NAME`) out of the override list."""
    exp = None
    rest: list[str] = []
    for item in argv:
        key, sep, value = item.partition("=")
        if sep and key.lstrip("+") == "exp":
            if not value:
                raise ConfigError("exp: needs a name, e.g. +exp=quickstart")
            exp = value
        else:
            rest.append(item)
    return exp, rest


def build_plan(
    exp: str | None, overrides: Sequence[str] = (), *, only: Sequence[str] | None = None
) -> Plan:
    """Compose and validate the base config and every job of its sweep."""
    try:
        parsed = parse_overrides(list(overrides))
    except OverrideError as err:
        raise ConfigError(str(err)) from None
    fixed = [p.line() for p in parsed if not p.is_sweep]
    cli_sweeps = [p for p in parsed if p.is_sweep]

    base = validate(compose_experiment(exp, fixed))
    clash = sorted(
        {p.key for p in parsed if not p.is_sweep} & swept_keys(base.variants, base.sweep)
    )
    if clash:
        raise ConfigError(
            f"{clash[0]}: set on the command line but swept by +exp={exp}; "
            "drop the override or restrict the sweep with --only"
        )
    try:
        variants = expand_sweep(base.variants, base.sweep, cli_sweeps)
    except OverrideError as err:
        raise ConfigError(str(err)) from None
    if only:
        wanted = set(only)
        variants = [v for v in variants if v.name in wanted or wanted & set(v.name.split(","))]
        if not variants:
            raise ConfigError(f"--only: no job named {sorted(wanted)} in +exp={exp}")

    exp_name = exp or base.name
    plan = Plan(
        exp=exp_name,
        exp_dir=exp_dir_for(base.run_root, exp_name),
        overrides=list(overrides),
        launcher=base.launcher,
        cluster=base.cluster,
    )
    seen: dict[Path, str] = {}
    for index, variant in enumerate(variants):
        job_overrides = fixed + list(variant.overrides)
        cfg = compose_experiment(exp, job_overrides)
        cfg.sweep = {}
        cfg.variants = {}
        try:
            obj = validate(cfg)
            check_data(obj, cfg, job_overrides)  # each step's data against the shards
        except ConfigError as err:
            raise ConfigError(f"job {variant.name!r}: {err}") from None
        if obj.launcher != base.launcher or obj.cluster != base.cluster:
            raise ConfigError(
                f"job {variant.name!r}: a sweep may not change launcher/cluster "
                "(one experiment is one job array)"
            )
        identity = tuple(identity_overrides(job_overrides))
        run_dir = run_dir_for(obj.run_root, exp_name, identity)
        if run_dir in seen:
            raise ConfigError(
                f"jobs {seen[run_dir]!r} and {variant.name!r} have the same overrides "
                f"({list(identity)}); they would share {run_dir}"
            )
        seen[run_dir] = variant.name
        plan.jobs.append(
            PlannedJob(
                index=index,
                name=variant.name,
                overrides=variant.overrides,
                identity=identity,
                run_dir=run_dir,
                config=obj,
                config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
            )
        )
    return plan


def mark_active(plan: Plan) -> None:
    """Set `active_job` on jobs whose run dir still has a queued or running job."""
    latest = latest_jobs(read_record(plan.exp_dir))
    slurm_ids = [j["job_id"] for j in latest.values() if j.get("launcher") == "slurm"]
    states = slurm_states(slurm_ids) if slurm_ids else {}
    host = socket.gethostname()
    for job in plan.jobs:
        prev = latest.get(str(job.run_dir))
        if prev is not None:
            if prev["launcher"] == "slurm" and states.get(prev["job_id"]) in ACTIVE_SLURM_STATES:
                job.active_job = prev["job_id"]
                continue
            if (
                prev["launcher"] == "local"
                and prev.get("host") == host
                and pid_alive(int(prev["job_id"]))
            ):
                job.active_job = prev["job_id"]
                continue
        status = read_status(job.run_dir)
        if (
            status is not None
            and status.get("state") == "RUNNING"
            and status.get("host") == host
            and status.get("slurm_job_id") is None
            and pid_alive(int(status.get("pid", -1)))
        ):
            job.active_job = prev["job_id"] if prev else f"pid:{status['pid']}"


def check_before_queue(
    plan: Plan,
    exp: str | None,
    overrides: Sequence[str],
    *,
    only: Sequence[str] | None = None,
    resources: bool = True,
    utilisation: float | None = None,
    dry_run: bool = False,
) -> tuple[Plan, list[str]]:
    """Preflight every job, then (for SLURM launches) size it; (plan, lines to print).

    Raises ConfigError naming the key or the memory term when a job would fail after
    queueing. wandb online on a cluster marked `offline` is switched to offline (the plan
    is rebuilt with `wandb.mode=offline`, a launch-only key: the run dirs do not change).
    With `dry_run` (`launch.py --dry-run`, often run where the cluster's weights are not),
    a path that cannot be read here is a warning line instead, and the plan is then not
    sized (sizing reads the model configs under those paths); a real launch and
    `launch.py plan` refuse it.
    """
    from setok_experiments import preflight
    from setok_experiments.resources import DEFAULT_UTILISATION, format_plan, plan_resources

    lines: list[str] = []
    if plan.jobs:
        switch = preflight.wandb_override(plan.jobs[0].config)
        if switch is not None:
            lines.append(
                f"note: cluster {plan.cluster.name} is marked offline (no network on its nodes): "
                "wandb.mode=online switched to offline (sync later with `wandb sync`)"
            )
            plan = build_plan(exp, [*overrides, switch], only=only)
    on_cluster = plan.launcher.kind == "slurm"
    world = plan.cluster.nodes * plan.cluster.tasks_per_node if on_cluster else 1
    unreadable: list[str] = []
    for job in plan.jobs:
        where = f"job {job.name!r}: " if len(plan.jobs) > 1 else ""
        try:
            preflight.check_required(exp, job.config)
            if dry_run:
                _, problems = preflight.path_problems(job.config)
                unreadable += [f"{where}{p}" for p in problems if f"{where}{p}" not in unreadable]
            else:
                preflight.check_paths(job.config)
            preflight.check_export_llm(job.config)
            if on_cluster:
                preflight.check_resume_world_size(job.run_dir, world, job.config.trainer)
        except ConfigError as err:
            raise ConfigError(f"{where}{err}") from None
    if unreadable:
        lines += [f"warning: {p} (a launch refuses this)" for p in unreadable]
        if resources:
            lines.append("note: not sized: the plan reads the model configs under these paths")
    elif resources and plan.jobs:
        from setok_experiments.resources import unplanned_steps

        shown: set[str] = set()
        for job in plan.jobs:
            for name in unplanned_steps(job.config):
                note = f"note: step {name!r} is not sized (the plan covers stage1-3)"
                if note not in lines:
                    lines.append(note)
            for step in plan_resources(job.config, utilisation=utilisation or DEFAULT_UTILISATION):
                table = format_plan(step)
                if table not in shown:
                    shown.add(table)
                    lines.append(table)
                problem = step.problem()
                if problem is not None:
                    raise ConfigError(f"job {job.name!r}: {problem}")
    return plan, lines
