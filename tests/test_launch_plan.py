"""Launcher planning: overrides, run-dir hashing, sweep expansion, compose-time validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from setok_experiments.compose import ConfigError, load_experiment
from setok_experiments.overrides import (
    OverrideError,
    canonical,
    format_value,
    identity_overrides,
    parse_overrides,
)
from setok_experiments.plan import build_plan, split_exp
from setok_experiments.rundir import override_hash, run_dir_for
from setok_experiments.sweep import expand_sweep


def test_canonical_sorts_and_last_override_wins() -> None:
    assert canonical(["b=2", "a=1", "b=3"]) == ["a=1", "b=3"]
    assert canonical(["+x.y='hello world'", "a=1"]) == ["+x.y='hello world'", "a=1"]


def test_identity_drops_launch_only_keys() -> None:
    lines = ["launcher=slurm", "cluster.partition=gpu", "wandb=disabled", "trainer.lr=0.1"]
    assert identity_overrides(lines + ["run_root=/x"]) == ["trainer.lr=0.1"]


@pytest.mark.parametrize(
    "value", [None, True, 3, 0.001, "dynamic", "hello world", "it's", "null", [1, 2]]
)
def test_format_value_parses_back_to_the_same_value(value: object) -> None:
    (parsed,) = parse_overrides([f"k={format_value(value)}"])
    (again,) = parse_overrides([parsed.line()])
    assert again.values == parsed.values
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (override,) = OverridesParser.create().parse_overrides([f"k={format_value(value)}"])
    assert override.value() == value


def test_bad_override_syntax_names_the_override() -> None:
    with pytest.raises(OverrideError, match="trainer.lr=="):
        parse_overrides(["trainer.lr=="])


def test_run_dir_hash_is_deterministic_and_order_free(tmp_path: Path) -> None:
    a = run_dir_for(tmp_path, "exp", identity_overrides(["trainer.seed=1", "trainer.lr=0.1"]))
    b = run_dir_for(tmp_path, "exp", identity_overrides(["trainer.lr=0.1", "trainer.seed=1"]))
    c = run_dir_for(tmp_path, "exp", identity_overrides(["trainer.lr=0.2", "trainer.seed=1"]))
    d = run_dir_for(tmp_path, "exp", identity_overrides(["trainer.lr=0.1", "launcher=slurm"]))
    assert a == b != c
    assert a.parent == tmp_path / "exp" and len(a.name) == 12
    assert d.name == override_hash(["trainer.lr=0.1"])


def test_expand_sweep_crosses_variants_grid_and_cli_axes() -> None:
    variants = {"hard": ["t.assignment=hard"], "soft": ["t.assignment=soft", "t.k=4"]}
    grid = {"trainer.seed": [0, 1]}
    (cli,) = parse_overrides(["trainer.lr=0.1,0.2"])
    jobs = expand_sweep(variants, grid, [cli])
    assert len(jobs) == 2 * 2 * 2
    assert jobs[0].name == "hard,seed=0,lr=0.1"
    assert jobs[-1].overrides == ("t.assignment=soft", "t.k=4", "trainer.seed=1", "trainer.lr=0.2")
    assert len({j.overrides for j in jobs}) == len(jobs)
    with pytest.raises(OverrideError, match="trainer.seed"):
        expand_sweep({}, grid, parse_overrides(["trainer.seed=3,4"]))


def test_split_exp() -> None:
    assert split_exp(["+exp=quick", "a=1"]) == ("quick", ["a=1"])
    assert split_exp(["a=1"]) == (None, ["a=1"])
    with pytest.raises(ConfigError, match="exp"):
        split_exp(["+exp="])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.max_stepz=5", "trainer.max_stepz"),
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("trainer.mixed_precision=fp64", "mixed_precision"),
        ("tokenizer.clustering.mechanismm=fixed", "tokenizer.clustering.mechanismm"),
        ("launcher.kind=pbs", "launcher.kind"),
        ("cluster.nodes=0", "cluster.nodes"),
        ("launcher=nope", "launcher/nope"),
        ("stage.name=nope", "stage.name"),
        ("+stage.params.wrong_key=1", "wrong_key"),
    ],
)
def test_bad_override_fails_at_compose_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_experiment("smoke_toy", [override])
    assert key in str(info.value)


def test_cluster_profiles_come_from_the_slurm_folder() -> None:
    cfg = load_experiment("smoke_toy", ["cluster=gpu_debug"])
    assert cfg.cluster.name == "gpu_debug"
    assert cfg.cluster.gpus_per_node == 1 and cfg.cluster.tasks_per_node == 1
    assert cfg.cluster.partition == "gpu"  # inherited from gpu_a100 through its defaults


def test_plan_expands_the_sweep_with_distinct_run_dirs(tmp_path: Path) -> None:
    plan = build_plan("smoke_toy", [f"run_root={tmp_path}", "trainer.max_steps=3"])
    assert [j.name for j in plan.jobs] == ["seed=0", "seed=1"]
    assert {j.run_dir.parent for j in plan.jobs} == {tmp_path / "smoke_toy"}
    assert len({j.run_dir for j in plan.jobs}) == 2
    assert plan.jobs[1].identity == ("trainer.max_steps=3", "trainer.seed=1")
    assert "sweep: {}" in plan.jobs[0].config_yaml and "seed: 1" in plan.jobs[1].config_yaml
    again = build_plan("smoke_toy", ["trainer.max_steps=3", f"run_root={tmp_path}"])
    assert [j.run_dir for j in again.jobs] == [j.run_dir for j in plan.jobs]
    only = build_plan("smoke_toy", [f"run_root={tmp_path}"], only=["seed=1"])
    assert [j.name for j in only.jobs] == ["seed=1"]


def test_plan_refuses_an_override_of_a_swept_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trainer.seed"):
        build_plan("smoke_toy", [f"run_root={tmp_path}", "trainer.seed=3"])


def test_plan_refuses_a_sweep_over_launchers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="launcher"):
        build_plan("smoke_toy", [f"run_root={tmp_path}", "launcher.poll_s=1,2"])


def _a100_parameters() -> tuple[object, dict[str, object]]:
    from setok_experiments.executors import slurm_parameters

    cluster = load_experiment("smoke_toy", ["cluster=gpu_a100", "cluster.nodes=2"]).cluster
    return cluster, slurm_parameters(cluster, "setok-x")


def test_cluster_profile_maps_to_valid_submitit_slurm_parameters(tmp_path: Path) -> None:
    """The profile renders through submitit's own sbatch writer (what SlurmExecutor's
    update_parameters runs to reject unknown names, and what it submits), so no SLURM needed."""
    from submitit.slurm.slurm import _make_sbatch_string

    cluster, params = _a100_parameters()
    assert params["nodes"] == 2
    assert params["ntasks_per_node"] == params["gpus_per_node"] == 8  # one task per GPU
    assert params["mem"] == f"{480 * 1024}MB" and params["constraint"] == "a100"
    assert "account" not in params  # null in the profile: not passed to sbatch
    script = _make_sbatch_string(command="python -m job", folder=tmp_path / "%j", **params)
    flags = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in script.splitlines()
             if line.startswith("#SBATCH --")}  # fmt: skip
    assert flags["#SBATCH --nodes"] == "2"
    assert flags["#SBATCH --ntasks-per-node"] == flags["#SBATCH --gpus-per-node"] == "8"
    assert flags["#SBATCH --time"] == str(cluster.time_min)
    assert flags["#SBATCH --mem"] == f"{480 * 1024}MB"
    assert flags["#SBATCH --constraint"] == "a100"
    assert flags["#SBATCH --signal"].endswith(f"@{cluster.signal_delay_s}")
    assert "#SBATCH --account" not in flags
    lines = script.splitlines()
    assert lines[lines.index("# setup") + 1 :][: len(cluster.setup)] == list(cluster.setup)
    with pytest.raises(TypeError, match="no_such_flag"):  # the writer refuses unknown names
        _make_sbatch_string(command="x", folder=tmp_path, **params, no_such_flag=1)

    from setok_experiments.executors import slurm_parameters

    dev = slurm_parameters(load_experiment("smoke_toy", ["cluster=dev"]).cluster, "setok-x")
    assert dev["ntasks_per_node"] == 1 and "gpus_per_node" not in dev
    assert dev["partition"] == "dev"


@pytest.mark.slurm
def test_cluster_profile_is_accepted_by_a_real_slurm_executor(tmp_path: Path) -> None:
    import shutil

    import submitit

    if shutil.which("srun") is None:  # like tests/test_slurm_launch.py: CI has the dev cluster
        if os.environ.get("CI") == "true":
            pytest.fail("srun not on PATH (run slurm/dev-cluster/up.sh)")
        pytest.skip("srun not on PATH (run slurm/dev-cluster/up.sh)")
    cluster, params = _a100_parameters()
    executor = submitit.SlurmExecutor(folder=tmp_path)
    executor.update_parameters(**params)  # raises on any name sbatch/submitit does not know
    assert executor.parameters["time"] == cluster.time_min
    assert executor.parameters["setup"] == cluster.setup
