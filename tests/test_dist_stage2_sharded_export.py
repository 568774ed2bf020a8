"""The tiny Stage II -> Stage III pipeline on 2 gloo ranks: Stage II's export is written by
both ranks (one shard each, cast from the fp32 master weights to the LLM's bf16), and Stage
III starts from the same weights as from the single-file export one process writes of the
same checkpoint; Stage III's adapter export over the sharded base validates and loads."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.dist

TRAINER = {"max_steps": 2, "micro_batch_size": 2, "lr": 1e-3, "progress": False,
           "mixed_precision": "bf16"}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _steps(data: Path) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    common = {"data": {"shard_dir": str(data)}, "generate_train": 8, "cpu_threads": 1}
    stage2 = {**common, "model": {"llm": {"dtype": "bfloat16"}}}
    return [("stage2", stage2, dict(TRAINER)), ("stage3", dict(common), dict(TRAINER))]


def _worker(rank: int, port: int, root: str) -> None:
    import torch.distributed as dist

    from setokim.stages.pipeline import run_pipeline

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        run_pipeline(_steps(Path(root) / "data"), Path(root) / "run")
    finally:
        dist.destroy_process_group()


def _stage3_start(export: Path, data: Path) -> dict[str, torch.Tensor]:
    """Stage III's starting weights from `export`, LoRA adapters left out."""
    from setokim.stages import build_stage

    params = {**_steps(data)[1][1], "init_from": str(export)}
    model = build_stage("stage3", params).build_model()
    return {
        k.replace(".base_layer.", "."): v
        for k, v in model.trainable_state_dict().items()
        if "lora_" not in k
    }


def test_pipeline_stage2_sharded_export_starts_stage3_as_the_single_file_one(
    tmp_path: Path,
) -> None:
    from safetensors.torch import load_file

    from setokim.model.export import weights_sha256
    from setokim.model.setokim import SeTokIM
    from setokim.model.sharded import INDEX_FILE, checkpoint_tensors
    from setokim.stages import build_stage
    from setokim.train.checkpoint import verify_checkpoint

    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2,
                       start_method="fork")  # fmt: skip
    run, data = tmp_path / "run", tmp_path / "data"
    sharded = run / "stage2" / "export"
    record = json.loads((run / "stage2" / "pipeline_step.json").read_text())
    assert record["export"] == str(sharded.resolve())
    assert not (sharded / "model.safetensors").exists() and verify_checkpoint(sharded) == []
    index = json.loads((sharded / INDEX_FILE).read_text())["weight_map"]
    assert len(set(index.values())) == 2  # one shard per rank
    assert not any(k.startswith("vision_tokenizer.") for k in index)  # the frozen SeTok
    assert (sharded / "setok" / "model.safetensors").is_file()

    stored = checkpoint_tensors(record["checkpoint"])  # fp32 master weights: cast on export
    assert stored["llm.lm_head.weight"].properties.dtype == torch.float32

    # the single-file export of the same checkpoint, as one process writes it
    stage2 = build_stage("stage2", _steps(data)[0][1])
    single = stage2.export(Path(record["checkpoint"]), tmp_path / "single")
    assert (single / "model.safetensors").is_file()
    want = load_file(str(single / "model.safetensors"))
    assert set(index) == set(want)
    assert {v.dtype for v in want.values()} == {torch.bfloat16}
    shards = {}
    for file in set(index.values()):
        shards.update(load_file(str(sharded / file)))
    assert all(torch.equal(shards[k], want[k]) and shards[k].dtype == want[k].dtype
               for k in want)  # fmt: skip
    config = lambda d: json.loads((d / "setokim_config.json").read_text())  # noqa: E731
    assert config(sharded) == config(single)

    ours, theirs = _stage3_start(sharded, data), _stage3_start(single, data)
    assert set(ours) == set(theirs) == set(want)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    # Stage III (trained on both ranks) wrote an adapter export over the sharded base
    adapter = run / "stage3" / "export"
    info = json.loads((adapter / "adapter_base.json").read_text())
    assert info["base"] == str(sharded.resolve())
    assert set(index.values()) <= set(info["weights_sha256"])
    loaded = SeTokIM.from_pretrained(adapter)
    assert loaded.config.lora.enabled

    # killed after the export, before its step record: the relaunch writes it again, the
    # same bytes (Stage III's recorded base hashes still hold), and skips Stage III
    (run / "stage2" / "pipeline_step.json").unlink()
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2,
                       start_method="fork")  # fmt: skip
    assert (run / "stage2" / "pipeline_step.json").is_file()
    assert verify_checkpoint(sharded) == [] and not (run / "stage2" / "export.partial").exists()
    again = weights_sha256(sharded)
    assert all(again[f] == info["weights_sha256"][f] for f in set(index.values()))
    SeTokIM.from_pretrained(adapter)
