"""Checkpoints hold only what trains: frozen modules built from files are referenced by path
and SHA-256 (frozen_sources.json), and a changed source is refused at resume and export."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from setokim.stages.toy import ToyConfig, ToyStage
from setokim.train import TrainerConfig, latest_checkpoint, load_model_state, train
from setokim.train.checkpoint import (
    FROZEN_FILE,
    CheckpointError,
    SafeFileSystemReader,
    tree_sha256,
)

TOY = ToyConfig(hidden=16, depth=1)


class FrozenEmbedToy(ToyStage):
    """The toy objective with its input layer frozen and read from a weights folder (as
    Stage II reads its SeTok from a Stage I export)."""

    def __init__(self, source: Path) -> None:
        super().__init__(TOY)
        self.source = source

    def frozen_sources(self) -> dict[str, Path]:
        return {"embed": self.source}

    def build_model(self) -> nn.Module:
        model = super().build_model()
        model.embed.load_state_dict(load_file(str(self.source / "embed.safetensors")))
        model.embed.requires_grad_(False)
        return model


def _source(root: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    weights = {"weight": torch.randn(16, TOY.in_dim, generator=g), "bias": torch.zeros(16)}
    save_file(weights, str(root / "embed.safetensors"))
    (root / "config.json").write_text(json.dumps({"seed": seed}))
    return root


def _cfg(max_steps: int) -> TrainerConfig:
    return TrainerConfig(max_steps=max_steps, micro_batch_size=4, lr=3e-3, ckpt_every=2,
                         log_every=1, progress=False)  # fmt: skip


def _stored_keys(step_dir: Path) -> set[str]:
    return set(SafeFileSystemReader(step_dir).read_metadata().state_dict_metadata)


def test_frozen_source_is_referenced_not_stored_and_resume_is_exact(tmp_path: Path) -> None:
    src = _source(tmp_path / "embed_export")
    run = tmp_path / "run"

    def stop_at_2(step: int, loss: float) -> None:
        if step == 2:
            signal.raise_signal(signal.SIGTERM)

    assert train(FrozenEmbedToy(src), _cfg(4), run, on_step=stop_at_2).preempted
    step_dir = latest_checkpoint(run)
    keys = _stored_keys(step_dir)
    assert not any(k.startswith(("model.embed.", "optim.state.embed.")) for k in keys), keys
    assert "model.head.weight" in keys
    record = json.loads((step_dir / FROZEN_FILE).read_text())
    assert record == {"embed": {"path": str(src.resolve()), "sha256": tree_sha256(src)}}
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert FROZEN_FILE in manifest["files"]  # the record itself is verified at resume

    resumed = train(FrozenEmbedToy(src), _cfg(4), run)
    assert resumed.resumed_from == 2 and resumed.step == 4
    straight = tmp_path / "straight"
    train(FrozenEmbedToy(src), _cfg(4), straight)
    got = load_model_state(latest_checkpoint(run), FrozenEmbedToy(src).build_model())
    want = load_model_state(latest_checkpoint(straight), FrozenEmbedToy(src).build_model())
    for key, value in want.state_dict().items():
        torch.testing.assert_close(got.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert torch.equal(got.embed.weight, load_file(str(src / "embed.safetensors"))["weight"])


def test_a_changed_frozen_source_is_refused_at_resume_and_load(tmp_path: Path) -> None:
    src = _source(tmp_path / "embed_export")
    run = tmp_path / "run"
    train(FrozenEmbedToy(src), _cfg(2), run)
    before = tree_sha256(src)
    _source(src, seed=1)  # the export retrained in place
    assert tree_sha256(src) != before
    with pytest.raises(CheckpointError, match=r"frozen embed at .*embed_export .* changed since"):
        train(FrozenEmbedToy(src), _cfg(4), run)
    with pytest.raises(CheckpointError, match=r"frozen embed at .*embed_export .* changed since"):
        load_model_state(latest_checkpoint(run), FrozenEmbedToy(src).build_model())
    # A model that declares no frozen sources cannot take a checkpoint without them.
    with pytest.raises(CheckpointError, match=r"does not store its frozen parameters"):
        train(ToyStage(TOY), _cfg(4), run)


@pytest.mark.slow
def test_stage2_and_stage3_checkpoints_hold_only_what_trains(tmp_path: Path) -> None:
    """Stage II over a SeTok export, Stage III over the Stage II export: no frozen weight in
    either checkpoint, each export/source recorded; a retrained SeTok is refused."""
    from setok_tokenizer import SeTok
    from setokim.stages import build_stage
    from setokim.stages.common import tiny_tokenizer

    setok_dir = tmp_path / "setok"
    setok = SeTok.from_config(tiny_tokenizer())
    setok.save_pretrained(str(setok_dir))
    buffers = {f"model.vision_tokenizer.{n}" for n, _ in setok.named_buffers()}
    common = {"data": {"shard_dir": str(tmp_path / "data")}, "generate_train": 8,
              "cpu_threads": 1}  # fmt: skip
    trainer = TrainerConfig(max_steps=1, micro_batch_size=2, lr=1e-3, progress=False)
    stage2 = build_stage("stage2", {**common, "init_tokenizer": str(setok_dir)})
    train(stage2, trainer, tmp_path / "s2")
    step2 = latest_checkpoint(tmp_path / "s2")
    keys = _stored_keys(step2)
    # SeTok's parameters are not stored (its few buffers, pixel mean/std, are)
    assert {k for k in keys if ".vision_tokenizer." in k} <= buffers
    assert any(k.startswith("model.llm.") for k in keys)
    record = json.loads((step2 / FROZEN_FILE).read_text())
    assert record["setok"]["sha256"] == tree_sha256(setok_dir)
    export = stage2.export(step2, tmp_path / "export2")

    stage3 = build_stage("stage3", {**common, "init_from": str(export)})
    train(stage3, trainer, tmp_path / "s3")
    step3 = latest_checkpoint(tmp_path / "s3")
    trained = {k for k in _stored_keys(step3) if k.startswith("model.")} - buffers
    assert trained and all("lora_" in k for k in trained), sorted(trained)[:5]
    assert json.loads((step3 / FROZEN_FILE).read_text())["base"]["path"] == str(export.resolve())

    weights = next(setok_dir.glob("*.safetensors"))
    tensors = load_file(str(weights))
    save_file({k: v + 1 for k, v in tensors.items()}, str(weights))  # SeTok retrained in place
    more = TrainerConfig(max_steps=2, micro_batch_size=2, lr=1e-3, progress=False)
    rebuilt = build_stage("stage2", {**common, "init_tokenizer": str(setok_dir)})
    with pytest.raises(CheckpointError, match=r"frozen setok at .*setok .* changed since"):
        train(rebuilt, more, tmp_path / "s2")
