"""Sharded exports on 2 gloo ranks: every rank writes its shard, a killed write resumes with
the missing shard only, and a meta-device model sharded with FSDP2 reads per rank only its
rows (bytes materialised per rank about half of the model)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from setokim.model.sharded import INDEX_FILE, load_sharded_weights, write_sharded_export
from setokim.train.checkpoint import verify_checkpoint

pytestmark = pytest.mark.dist

LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reference() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA))


def _worker(rank: int, port: int, root: str, phase: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out = Path(root) / "export"
        if phase.startswith("write"):
            state = _reference().state_dict()
            sizes = {k: v.numel() * v.element_size() for k, v in state.items()}

            def materialise(names: list[str]) -> dict[str, torch.Tensor]:
                Path(root, f"materialised_{phase}_rank{rank}").write_text(json.dumps(names))
                if phase == "write_killed" and rank == 1:
                    os._exit(1)  # killed before its shard exists
                return {n: state[n] for n in names}

            def fill(staging: Path) -> None:
                (staging / "config.json").write_text(json.dumps(LLAMA))

            write_sharded_export(out, sizes, materialise, fill)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            from transformers import LlamaConfig, LlamaForCausalLM

            mesh = init_device_mesh("cpu", (2,))
            with torch.device("meta"):
                model = LlamaForCausalLM(LlamaConfig(**LLAMA))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            model.to_empty(device="cpu")
            local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
            read = load_sharded_weights(model, out)
            ref = _reference().state_dict()
            diff = max(float((p.full_tensor() - ref[n]).abs().max())
                       for n, p in model.named_parameters())  # fmt: skip
            total = sum(v.numel() * v.element_size() for v in ref.values())
            Path(root, f"load_rank{rank}.json").write_text(
                json.dumps({"read": read, "local": local, "total": total, "diff": diff})
            )
    finally:
        dist.destroy_process_group()


def _spawn(root: Path, phase: str) -> None:
    mp.start_processes(_worker, args=(_free_port(), str(root), phase), nprocs=2,
                       start_method="fork")  # fmt: skip


def test_sharded_export_written_by_both_ranks_resumes_and_loads_half_per_rank(
    tmp_path: Path,
) -> None:
    with pytest.raises(mp.ProcessExitedException):
        _spawn(tmp_path, "write_killed")
    partial = tmp_path / "export.partial"
    assert not (tmp_path / "export").exists()
    assert (partial / "model-00001-of-00002.safetensors").is_file()  # rank 0 finished
    assert not (partial / "model-00002-of-00002.safetensors").exists()

    _spawn(tmp_path, "write")  # the relaunch: rank 0's shard is kept, rank 1 writes its own
    assert not (tmp_path / "materialised_write_rank0").exists()
    assert (tmp_path / "materialised_write_rank1").exists()
    export = tmp_path / "export"
    assert not partial.exists() and verify_checkpoint(export) == []
    index = json.loads((export / INDEX_FILE).read_text())
    shards = {f"model-0000{i}-of-00002.safetensors" for i in (1, 2)}
    assert set(index["weight_map"].values()) == shards
    assert set(index["weight_map"]) == set(_reference().state_dict())

    _spawn(tmp_path, "load")
    runs = [json.loads((tmp_path / f"load_rank{r}.json").read_text()) for r in (0, 1)]
    total = runs[0]["total"]
    for run in runs:
        assert run["diff"] == 0.0  # the gathered weights are the exported ones
        # each rank read and holds its rows only: about half of the model, not all of it
        assert 0.4 * total < run["read"] < 0.6 * total, run
        assert 0.4 * total < run["local"] < 0.6 * total, run
    assert sum(r["read"] for r in runs) == total  # every byte read once, by one rank


def _train_and_export(rank: int, port: int, root: str) -> None:
    import torch.distributed as dist

    from setokim.model.sharded import export_checkpoint_weights
    from setokim.stages import build_stage
    from setokim.train import TrainerConfig, latest_checkpoint, train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = TrainerConfig(max_steps=2, micro_batch_size=4, lr=3e-3, progress=False)
        train(build_stage("toy", TOY), cfg, Path(root) / "run")  # FSDP2 over the 2 ranks
        step = latest_checkpoint(Path(root) / "run")
        export_checkpoint_weights(step, Path(root) / "export", dtype=torch.bfloat16)
    finally:
        dist.destroy_process_group()


TOY = {"hidden": 32, "depth": 4}


def test_checkpoint_exported_by_both_ranks_without_building_the_model(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from setokim.stages import build_stage
    from setokim.train import latest_checkpoint, load_model_state

    mp.start_processes(_train_and_export, args=(_free_port(), str(tmp_path)), nprocs=2,
                       start_method="fork")  # fmt: skip
    export = tmp_path / "export"
    assert verify_checkpoint(export) == []
    shards = sorted(export.glob("model-*.safetensors"))
    assert [p.name for p in shards] == ["model-00001-of-00002.safetensors",
                                        "model-00002-of-00002.safetensors"]  # fmt: skip
    sizes = [p.stat().st_size for p in shards]
    assert max(sizes) < 0.6 * sum(sizes)  # each rank wrote about half
    got: dict[str, torch.Tensor] = {}
    for p in shards:
        got.update(load_file(str(p)))
    want = load_model_state(latest_checkpoint(tmp_path / "run"),
                            build_stage("toy", TOY).build_model()).state_dict()  # fmt: skip
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == torch.bfloat16
        torch.testing.assert_close(got[key], value.to(torch.bfloat16), rtol=0, atol=0, msg=key)
