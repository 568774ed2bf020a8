"""2-process FSDP2 over gloo: equals 1 process on the same global batch; resumes on 1 rank."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from setokim.stages import build_stage
from setokim.train import TrainerConfig, latest_checkpoint, load_model_state, train
from setokim.train.checkpoint import CheckpointError

pytestmark = pytest.mark.dist

TOY = {"hidden": 32, "depth": 2}
COMMON = {"max_steps": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 1, "log_every": 1}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(
    rank: int, port: int, run_dir: str, micro_batch_size: int, preempt_at: int, policy: str
) -> None:
    # The torchrun contract, so the loop's environment detection is what gets exercised.
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)

    def on_step(step: int, loss: float) -> None:
        if rank == 0 and step == preempt_at:
            signal.raise_signal(signal.SIGTERM)  # only rank 0 is signalled

    cfg = TrainerConfig(
        **COMMON, micro_batch_size=micro_batch_size, progress=False, world_size_change=policy
    )
    result = train(build_stage("toy", TOY), cfg, run_dir, on_step=on_step)
    if rank == 0:
        summary = {"step": result.step, "preempted": result.preempted, "world": result.world_size}
        Path(run_dir, "result.json").write_text(json.dumps(summary))


def _two_ranks(
    run_dir: Path, micro_batch_size: int, preempt_at: int = -1, policy: str = "refuse"
) -> dict:
    # fork: the children inherit the imported torch instead of importing it again.
    mp.start_processes(
        _worker,
        args=(_free_port(), str(run_dir), micro_batch_size, preempt_at, policy),
        nprocs=2,
        start_method="fork",
    )
    return json.loads((run_dir / "result.json").read_text())


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    model = build_stage("toy", TOY).build_model()
    return load_model_state(latest_checkpoint(run_dir), model).state_dict()


def _one_process(run_dir: Path) -> dict[str, torch.Tensor]:
    cfg = TrainerConfig(**COMMON, micro_batch_size=8, progress=False)
    train(build_stage("toy", TOY), cfg, run_dir)
    return _weights(run_dir)


def test_two_rank_fsdp_matches_one_process(tmp_path: Path) -> None:
    summary = _two_ranks(tmp_path / "fsdp2", micro_batch_size=4)
    assert summary["world"] == 2 and summary["step"] == 4
    meta = json.loads((tmp_path / "fsdp2" / "trainer.json").read_text())
    assert meta["fsdp"] is True and meta["env_source"] == "torchrun"
    sharded = _weights(tmp_path / "fsdp2")  # loads the 2-rank DCP checkpoint on 1 process
    single = _one_process(tmp_path / "single")
    for key in single:
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(
        sharded["head.weight"], build_stage("toy", TOY).build_model().head.weight
    )


def test_two_rank_checkpoint_resumes_on_one_rank(tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = _two_ranks(run, 4, preempt_at=2)
    assert summary["preempted"] and summary["step"] == 2
    state = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["data_position"] == 4
    assert sorted(p.name for p in latest_checkpoint(run).glob("rng_rank*")) == [
        "rng_rank0.safetensors",
        "rng_rank1.safetensors",
    ]
    # Another world size is refused by default, naming both, before anything is loaded.
    with pytest.raises(CheckpointError, match=r"written by 2 rank\(s\), this run has 1"):
        train(build_stage("toy", TOY), TrainerConfig(**COMMON, micro_batch_size=8), run)
    # Resharding keeps the global batch: 4 x 2 ranks -> 8 x 1; 4 x 1 is refused.
    with pytest.raises(CheckpointError, match=r"global batch, which was 16 .* would be 8"):
        cfg = TrainerConfig(**COMMON, micro_batch_size=4, world_size_change="reshard")
        train(build_stage("toy", TOY), cfg, run)
    cfg = TrainerConfig(**COMMON, micro_batch_size=8, progress=False, world_size_change="reshard")
    resumed = train(build_stage("toy", TOY), cfg, run)
    assert resumed.resumed_from == 2 and resumed.step == 4 and resumed.world_size == 1
    single = _one_process(tmp_path / "single")
    got = _weights(run)
    for key in single:
        torch.testing.assert_close(got[key], single[key], rtol=1e-5, atol=1e-6, msg=key)


def test_one_rank_checkpoint_reshards_onto_two_ranks(tmp_path: Path) -> None:
    """1 -> 2 ranks with world_size_change=reshard: the same weights as never stopping."""
    run = tmp_path / "run"

    def stop_at_2(step: int, loss: float) -> None:
        if step == 2:
            signal.raise_signal(signal.SIGTERM)

    cfg = TrainerConfig(**COMMON, micro_batch_size=8, progress=False)
    first = train(build_stage("toy", TOY), cfg, run, on_step=stop_at_2)
    assert first.preempted and first.step == 2 and first.world_size == 1
    summary = _two_ranks(run, 4, policy="reshard")
    assert summary["world"] == 2 and summary["step"] == 4
    state = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())
    # 2 steps x 2 accum x 8 samples on 1 rank = 32 = 4 micro-batches x 4 x 2 ranks
    assert state["world_size"] == 2 and state["data_position"] == 8
    single = _one_process(tmp_path / "single")
    got = _weights(run)
    for key in single:
        torch.testing.assert_close(got[key], single[key], rtol=1e-5, atol=1e-6, msg=key)
