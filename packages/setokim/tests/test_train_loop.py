"""The training loop on the toy stage, single process on the CPU."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from setokim.stages import build_stage
from setokim.train import (
    NonFiniteLossError,
    TrainerConfig,
    WandbConfig,
    latest_checkpoint,
    list_checkpoints,
    load_model_state,
    train,
)

TOY = {"hidden": 32, "depth": 2}


def _cfg(**kw: object) -> TrainerConfig:
    base = {"max_steps": 12, "micro_batch_size": 8, "lr": 3e-3, "log_every": 1, "progress": False}
    base.update(kw)
    return TrainerConfig(**base)  # type: ignore[arg-type]


def _weights(run_dir: Path, stage_cfg: dict = TOY) -> dict[str, torch.Tensor]:
    stage = build_stage("toy", stage_cfg)
    model = load_model_state(latest_checkpoint(run_dir), stage.build_model())
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_loss_falls_and_metrics_are_logged(tmp_path: Path) -> None:
    result = train(build_stage("toy", TOY), _cfg(max_steps=40, warmup_steps=4), tmp_path)
    assert result.step == 40 and not result.preempted and result.skipped_steps == 0
    assert sum(result.history[-5:]) / 5 < 0.3 * sum(result.history[:5]) / 5
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 41))
    assert {"loss", "lr", "grad_norm", "samples_per_s"} <= lines[0].keys()
    assert lines[0]["lr"] < lines[3]["lr"]  # warmup
    assert lines[-1]["loss"] == pytest.approx(result.last_loss)
    assert result.checkpoint == latest_checkpoint(tmp_path)
    assert json.loads((tmp_path / "trainer.json").read_text())["trainer"]["max_steps"] == 40


def test_grad_accum_matches_bigger_micro_batch(tmp_path: Path) -> None:
    train(
        build_stage("toy", TOY), _cfg(micro_batch_size=4, grad_accum=2, max_steps=5), tmp_path / "a"
    )
    train(
        build_stage("toy", TOY), _cfg(micro_batch_size=8, grad_accum=1, max_steps=5), tmp_path / "b"
    )
    _assert_same(_weights(tmp_path / "a"), _weights(tmp_path / "b"), exact=False)


def test_keep_last_and_latest_pointer(tmp_path: Path) -> None:
    train(build_stage("toy", TOY), _cfg(max_steps=10, ckpt_every=2, keep_last=2), tmp_path)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step_00000008", "step_00000010"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_relaunch_of_finished_run_does_nothing(tmp_path: Path) -> None:
    train(build_stage("toy", TOY), _cfg(max_steps=4), tmp_path)
    before = _weights(tmp_path)
    again = train(build_stage("toy", TOY), _cfg(max_steps=4), tmp_path)
    assert again.resumed_from == 4 and again.step == 4 and again.history == []
    _assert_same(before, _weights(tmp_path), exact=True)


def test_half_written_checkpoint_is_ignored(tmp_path: Path) -> None:
    train(build_stage("toy", TOY), _cfg(max_steps=4, ckpt_every=2), tmp_path)
    debris = tmp_path / "checkpoints" / "step_00000006.tmp"
    debris.mkdir()
    (debris / "junk").write_text("killed mid-save")
    result = train(build_stage("toy", TOY), _cfg(max_steps=6, ckpt_every=2), tmp_path)
    assert result.resumed_from == 4 and result.step == 6
    assert not debris.exists() and latest_checkpoint(tmp_path).name == "step_00000006"


def test_sigterm_checkpoints_then_resume_is_bit_identical(tmp_path: Path) -> None:
    stage_cfg = {**TOY, "dropout": 0.2}  # dropout: the RNG state must be restored too
    cfg = _cfg(max_steps=10, grad_accum=2, warmup_steps=3)
    train(build_stage("toy", stage_cfg), cfg, tmp_path / "straight")

    def hit(step: int, loss: float) -> None:
        if step == 4:
            signal.raise_signal(signal.SIGTERM)

    first = train(build_stage("toy", stage_cfg), cfg, tmp_path / "cut", on_step=hit)
    assert first.preempted and first.step == 4
    assert latest_checkpoint(tmp_path / "cut").name == "step_00000004"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    second = train(build_stage("toy", stage_cfg), cfg, tmp_path / "cut")
    assert second.resumed_from == 4 and second.step == 10 and not second.preempted
    _assert_same(
        _weights(tmp_path / "straight", stage_cfg),
        _weights(tmp_path / "cut", stage_cfg),
        exact=True,
    )


def test_nonfinite_steps_are_skipped_then_abort(tmp_path: Path) -> None:
    stage_cfg = {**TOY, "nan_at": [2, 3]}
    result = train(build_stage("toy", stage_cfg), _cfg(max_steps=6), tmp_path / "skip")
    assert result.skipped_steps == 2 and result.step == 6
    events = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "nonfinite_skip"] == [3, 4]
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "skip", stage_cfg).values())

    stage_cfg = {**TOY, "nan_at": [1, 2, 3]}
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        train(
            build_stage("toy", stage_cfg),
            _cfg(max_steps=6, max_nonfinite_in_row=3),
            tmp_path / "abort",
        )


def test_skipped_step_leaves_weights_unchanged(tmp_path: Path) -> None:
    train(build_stage("toy", TOY), _cfg(max_steps=2), tmp_path)
    before = _weights(tmp_path)
    train(build_stage("toy", {**TOY, "nan_at": [2]}), _cfg(max_steps=3), tmp_path)
    _assert_same(before, _weights(tmp_path), exact=True)


def test_activation_checkpointing_gives_identical_weights(tmp_path: Path) -> None:
    stage_cfg = {**TOY, "dropout": 0.1}
    train(build_stage("toy", stage_cfg), _cfg(max_steps=4), tmp_path / "off")
    cfg = _cfg(max_steps=4, activation_checkpointing=True)
    train(build_stage("toy", stage_cfg), cfg, tmp_path / "on")
    _assert_same(
        _weights(tmp_path / "off", stage_cfg), _weights(tmp_path / "on", stage_cfg), exact=True
    )


def test_fsdp_on_one_rank_matches_plain(tmp_path: Path) -> None:
    train(build_stage("toy", TOY), _cfg(max_steps=4), tmp_path / "plain")
    train(build_stage("toy", TOY), _cfg(max_steps=4, fsdp="on"), tmp_path / "fsdp")
    _assert_same(_weights(tmp_path / "plain"), _weights(tmp_path / "fsdp"), exact=False)
    assert json.loads((tmp_path / "fsdp" / "trainer.json").read_text())["fsdp"] is True


@pytest.mark.slow  # wandb starts a service process: seconds
def test_wandb_offline_run_dir_created(tmp_path: Path) -> None:
    cfg = WandbConfig(mode="offline", project="setok-test", name="toy", tags=["unit"])
    train(build_stage("toy", TOY), _cfg(max_steps=3), tmp_path, wandb=cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert runs[0].name.endswith(run_id)
    assert list(runs[0].glob("*.wandb"))
