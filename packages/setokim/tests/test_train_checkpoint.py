"""Verified checkpoints: a manifest checked at resume, fallback to the previous verified
checkpoint, errors that name the file, and nothing in a checkpoint executed as code."""

from __future__ import annotations

import json
import pickle
import random
import signal
from pathlib import Path

import pytest
import torch

from setokim.stages import build_stage
from setokim.train import TrainerConfig, list_checkpoints, load_model_state, train
from setokim.train.checkpoint import (
    MANIFEST_FILE,
    CheckpointError,
    file_digest,
    init_optimizer_state,
    resume_checkpoint,
    verify_checkpoint,
)
from setokim.train.faults import damage, differing
from setokim.train.rng import load_rng_file

TOY = {"hidden": 16, "depth": 1}


def _cfg(**kw: object) -> TrainerConfig:
    base = {"max_steps": 6, "micro_batch_size": 4, "lr": 3e-3, "ckpt_every": 2, "keep_last": 2,
            "log_every": 1, "progress": False}  # fmt: skip
    return TrainerConfig(**{**base, **kw})  # type: ignore[arg-type]


def _weights(step_dir: Path) -> dict[str, torch.Tensor]:
    return load_model_state(step_dir, build_stage("toy", TOY).build_model()).state_dict()


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("straight")
    train(build_stage("toy", TOY), _cfg(max_steps=8), run)
    return run


def _run_to(run: Path, steps: int) -> Path:
    """Train towards 8 steps, stopped by SIGTERM after `steps` (saved there)."""

    def hook(step: int, loss: float) -> None:
        if step == steps:
            signal.raise_signal(signal.SIGTERM)

    train(build_stage("toy", TOY), _cfg(max_steps=8), run, on_step=hook)
    return run


def _reseal(step_dir: Path, name: str) -> None:
    """Rewrite the manifest entry of `name` as an attacker who can write the run dir would."""
    path = step_dir / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["files"][name] = file_digest(step_dir / name)
    path.write_text(json.dumps(manifest))


def test_manifest_lists_every_file_and_verifies(tmp_path: Path) -> None:
    train(build_stage("toy", TOY), _cfg(), tmp_path)
    step_dir = list_checkpoints(tmp_path)[-1]
    manifest = json.loads((step_dir / MANIFEST_FILE).read_text())
    on_disk = sorted(p.name for p in step_dir.iterdir() if p.name != MANIFEST_FILE)
    assert sorted(manifest["files"]) == on_disk
    assert {".metadata", "trainer_state.json", "rng_rank0.safetensors"} <= set(on_disk)
    assert verify_checkpoint(step_dir) == []


@pytest.mark.parametrize("mode", ["flip", "truncate", "empty", "delete", "extra", "manifest"])
def test_damaged_newest_checkpoint_falls_back_with_a_warning_naming_the_file(
    mode: str, tmp_path: Path, straight: Path
) -> None:
    _run_to(tmp_path, 6)  # checkpoints at 4 and 6
    newest = list_checkpoints(tmp_path)[-1]
    assert newest.name == "step_00000006"
    victim = next(newest.glob("*.distcp"))
    if mode in ("flip", "truncate", "empty"):
        damage(victim, mode, random.Random(0))
    elif mode == "delete":
        victim.unlink()
    elif mode == "extra":
        (newest / "rng_rank0.pt").write_bytes(b"left behind")
        victim = newest / "rng_rank0.pt"
    else:
        victim = newest / MANIFEST_FILE
        victim.write_text("{not json")
    with pytest.warns(RuntimeWarning, match=str(victim.name)):
        found, rejected = resume_checkpoint(tmp_path)
    assert found is not None and found.name == "step_00000004"
    assert len(rejected) == 1 and str(victim) in rejected[0]
    assert (tmp_path / "checkpoints" / "step_00000006.rejected").is_dir()
    # the run continues from step 4 and ends where the uninterrupted one did, bit for bit
    result = train(build_stage("toy", TOY), _cfg(max_steps=8), tmp_path)
    assert result.resumed_from == 4 and result.step == 8
    assert (
        differing(
            _weights(list_checkpoints(tmp_path)[-1]), _weights(list_checkpoints(straight)[-1])
        )
        == []
    )


def test_no_verified_checkpoint_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    train(build_stage("toy", TOY), _cfg(max_steps=4, keep_last=2), tmp_path)
    for step_dir in list_checkpoints(tmp_path):
        damage(next(step_dir.glob("*.distcp")), "truncate", random.Random(1))
    with pytest.warns(RuntimeWarning), pytest.raises(CheckpointError, match="passed verification"):
        train(build_stage("toy", TOY), _cfg(max_steps=6), tmp_path)


def test_load_model_state_refuses_a_corrupt_checkpoint_naming_the_file(tmp_path: Path) -> None:
    train(build_stage("toy", TOY), _cfg(max_steps=2), tmp_path)
    step_dir = list_checkpoints(tmp_path)[-1]
    state = step_dir / "trainer_state.json"
    state.write_text("")
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        _weights(step_dir)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("target", ["rng_rank0.safetensors", ".metadata", "trainer_state.json"])
def test_crafted_pickles_in_a_checkpoint_are_never_executed(target: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(build_stage("toy", TOY), _cfg(max_steps=2), run)
    step_dir = list_checkpoints(run)[-1]
    marker = tmp_path / "pwned"
    (step_dir / target).write_bytes(pickle.dumps(_Payload(marker)))
    _reseal(step_dir, target)  # the manifest cannot tell: only the loaders stand in the way
    assert verify_checkpoint(step_dir) == []
    with pytest.raises(CheckpointError, match=target.replace(".", r"\.")):
        train(build_stage("toy", TOY), _cfg(max_steps=4), run)
    assert not marker.exists()


def test_rng_file_loader_rejects_a_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "rng_rank0.safetensors"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="rng_rank0.safetensors"):
        load_rng_file(path)
    assert not marker.exists()


def test_optimizer_state_covers_parameters_before_their_first_gradient() -> None:
    used, unused = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW([*used.parameters(), *unused.parameters()], lr=0.1)
    assert init_optimizer_state(opt) == 4 and len(opt.state) == 4
    ref = torch.nn.Linear(2, 2)
    ref.load_state_dict(used.state_dict())
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=0.1)
    for _ in range(3):  # identical to Adam's lazy initialisation
        for model, o in ((used, opt), (ref, opt_ref)):
            o.zero_grad()
            model(torch.ones(1, 2)).sum().backward()
            o.step()
    assert torch.equal(used.weight, ref.weight)
    assert float(opt.state[unused.weight]["step"]) == 0.0
