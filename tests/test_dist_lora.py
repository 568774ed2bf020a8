"""Stage III under 2-process FSDP2 over gloo: a bf16 frozen LLM with fp32 LoRA adapters.

Each decoder layer is one FSDP2 unit holding frozen bf16 base weights next to trainable fp32
adapters, and the root unit holds the trainable bf16 projector beside the frozen fp32 SeTok.
FSDP2 needs one dtype only among a unit's *trainable* parameters, so this must train, move
only the adapters and the projector, and equal one process fed the same global batch.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from setokim.stages.stage3 import Stage3Config, Stage3Stage
from setokim.train import TrainerConfig, latest_checkpoint, load_model_state, train
from setokim.train.rng import seed_all

pytestmark = pytest.mark.dist

RANKS = 2
ACCUM = 2
# eps well above the gradients keeps AdamW from turning bf16 rounding noise in tiny
# gradients into whole lr-sized steps, so the two runs stay comparable.
TRAINER = {
    "max_steps": 3,
    "micro_batch_size": 2,
    "lr": 3e-3,
    "warmup_steps": 1,
    "seed": 5,
    "eps": 1e-3,
}


class Fp32AdapterStage3(Stage3Stage):
    """Stage III with the adapters kept in fp32 over the bf16 LLM (a master copy for AdamW)."""

    def build_model(self) -> nn.Module:
        model = super().build_model()
        for name, module in model.named_modules():
            if name.endswith(("lora_A", "lora_B")):
                module.float()
        return model


class GlobalBatchStage3(Fp32AdapterStage3):
    """One process seeing what every rank of a RANKS-process run sees, rank by rank.

    With grad_accum = RANKS * ACCUM this averages the same micro-batch losses the
    distributed run averages (over its micro-batches, then over ranks).
    """

    def batches(
        self, rank: int, world_size: int, start_step: int, micro_batch_size: int
    ) -> Iterator[Any]:
        if world_size != 1:
            raise ValueError(f"world_size must be 1 for the reference run, got {world_size}")
        streams = []
        for r in range(RANKS):
            streams.append(super().batches(r, RANKS, start_step, micro_batch_size))
        while True:
            for stream in streams:
                yield next(stream)


def _stage_cfg(data_dir: str) -> Stage3Config:
    from setok_tokenizer.config import from_dict

    params = {
        "model": {"llm": {"dtype": "bfloat16"}},
        "lora": {"dropout": 0.0, "train_heads": ["projector"]},
        "data": {"shard_dir": data_dir},
        "cpu_threads": 1,
        "generate_if_missing": False,
    }
    return from_dict(Stage3Config, params, where="stage3")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from setokim.data import generate_dataset

    out = tmp_path_factory.mktemp("dist_lora") / "shapes"
    generate_dataset(out, train=8, val=0, test=0, image_size=32, seed=4)
    return str(out)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, data_dir: str, run_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(RANKS), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    cfg = TrainerConfig(**TRAINER, grad_accum=ACCUM, fsdp="on", progress=False)
    result = train(Fp32AdapterStage3(_stage_cfg(data_dir)), cfg, run_dir)
    if rank == 0:
        summary = {"step": result.step, "world": result.world_size, "history": result.history}
        Path(run_dir, "result.json").write_text(json.dumps(summary))


def _initial(data_dir: str) -> nn.Module:
    seed_all(TRAINER["seed"])  # what the loop does before build_model
    return Fp32AdapterStage3(_stage_cfg(data_dir)).build_model()


def _trained(data_dir: str, run_dir: Path) -> dict[str, torch.Tensor]:
    return load_model_state(latest_checkpoint(run_dir), _initial(data_dir)).state_dict()


def test_stage3_fsdp2_mixed_dtypes_match_one_process(data_dir: str, tmp_path: Path) -> None:
    init = _initial(data_dir)
    layer = init.llm.get_decoder().layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert init.projector[0].weight.dtype == torch.bfloat16
    assert {p.dtype for p in init.vision_tokenizer.parameters()} == {torch.float32}
    before = {k: v.clone() for k, v in init.state_dict().items()}
    trainable = {n for n, p in init.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("projector.") for n in trainable)

    run = tmp_path / "fsdp2"
    mp.start_processes(
        _worker, args=(_free_port(), data_dir, str(run)), nprocs=RANKS, start_method="fork"
    )
    summary = json.loads((run / "result.json").read_text())
    assert summary["world"] == RANKS and summary["step"] == TRAINER["max_steps"]
    assert json.loads((run / "trainer.json").read_text())["fsdp"] is True
    sharded = _trained(data_dir, run)

    ref_cfg = TrainerConfig(**TRAINER, grad_accum=RANKS * ACCUM, fsdp="off", progress=False)
    ref = train(GlobalBatchStage3(_stage_cfg(data_dir)), ref_cfg, tmp_path / "single")
    single = _trained(data_dir, tmp_path / "single")

    torch.testing.assert_close(
        torch.tensor(summary["history"]), torch.tensor(ref.history), rtol=1e-3, atol=1e-3
    )
    changed = set()
    for key, value in sharded.items():
        assert value.dtype == before[key].dtype, key
        if not torch.equal(value, before[key]):
            changed.add(key)
        if value.dtype == torch.float32:  # fp32 adapters: within 2% of the step's update
            atol = 0.02 * float((single[key] - before[key]).abs().max()) + 1e-8
            torch.testing.assert_close(value, single[key], rtol=0.0, atol=atol, msg=key)
        else:  # bf16 weights and bf16 gradient accumulation: a couple of bf16 ulps
            torch.testing.assert_close(value, single[key], rtol=2e-2, atol=2e-3, msg=key)
    frozen_changed = {k for k in changed if "lora_" not in k and not k.startswith("projector.")}
    assert not frozen_changed, sorted(frozen_changed)
    assert any("lora_B" in k for k in changed) and any(k.startswith("projector.") for k in changed)
