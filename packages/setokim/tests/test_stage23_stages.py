"""Stages II and III: build from tiny random parts or exports, train on one batch, export."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from setokim.model.setokim import SeTokIM
from setokim.stages import build_stage


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from setokim.data import generate_dataset

    out = tmp_path_factory.mktemp("s23") / "shapes"
    generate_dataset(out, train=16, val=0, test=0, image_size=64, seed=3)
    return out


def _params(data_dir: Path, **kw: object) -> dict:
    return {"data": {"shard_dir": str(data_dir)}, "cpu_threads": 1, **kw}


def _fit(stage, model, batch, steps: int, lr: float) -> list[float]:
    params = stage.trainable(model)
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss, _ = stage.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _batch_of(stage, task: str):
    """The first batch of one task view, through the stage's own collation."""
    from setokim.data import make_loader
    from setokim.stages.stage2 import MLLMBatches

    d = stage.cfg.data
    raw = next(iter(make_loader(d.shard_dir, "train", task, 4, shuffle=False)))
    src = MLLMBatches(d, stage.mode, stage.model_cfg, stage.text_tokenizer(), stage.batch_hook())
    return src.layout(raw)


def test_stage2_mix_batches_and_loss_drops(data_dir: Path) -> None:
    stage = build_stage("stage2", _params(data_dir))
    model = stage.build_model()
    assert stage.fsdp_units(model) == list(model.llm.model.layers)
    assert not any(p.requires_grad for p in model.vision_tokenizer.parameters())
    it = stage.batches(0, 1, 0, 4)
    outputs = [bool(next(it).image_output.any()) for _ in range(8)]
    assert any(outputs) and not all(outputs)  # t2i/edit vs caption/chat batches
    batch = _batch_of(stage, "edit")  # text CE + regression to the frozen edited image
    loss0, metrics = stage.loss(model, batch)
    assert metrics["visual_targets"] > 0 and metrics["text_targets"] > 0
    target_before = model.encode_images(batch.pixels).tokens.clone()
    losses = _fit(stage, model, batch, steps=8, lr=3e-3)
    assert losses[-1] < 0.7 * losses[0], losses
    torch.testing.assert_close(model.encode_images(batch.pixels).tokens, target_before)


def test_stage2_question_suffix_reaches_vqa_but_not_captions(data_dir: Path) -> None:
    stage = build_stage("stage2", _params(data_dir, question_suffix=" Answer briefly."))
    vqa = stage.text_tokenizer().decode(_batch_of(stage, "vqa").text_ids[0]).lower()
    caption = stage.text_tokenizer().decode(_batch_of(stage, "caption").text_ids[0]).lower()
    assert "answer briefly" in vqa and "answer briefly" not in caption
    plain = build_stage("stage2", _params(data_dir))
    assert plain.batch_hook() is None  # no suffix: the views' batches as they are


def test_stage3_trains_only_lora_and_round_trips(data_dir: Path, tmp_path: Path) -> None:
    s2 = build_stage("stage2", _params(data_dir))
    s2.build_model().save_pretrained(tmp_path / "s2")
    stage = build_stage(
        "stage3",
        _params(
            data_dir,
            init_from=str(tmp_path / "s2"),
            lora={"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            question_suffix=" Answer briefly.",
        ),
    )
    model = stage.build_model()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = _batch_of(stage, "vqa")
    assert batch.image_output.sum() == 0
    text = stage.text_tokenizer().decode(batch.text_ids[0])
    assert "answer briefly" in text.lower()  # the hook's suffix reached the sample
    losses = _fit(stage, model, batch, steps=8, lr=1e-2)
    assert losses[-1] < 0.9 * losses[0], losses
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)

    model.config = replace(model.config, **stage.export_fields())
    model.save_pretrained(tmp_path / "s3")
    loaded = SeTokIM.from_pretrained(tmp_path / "s3").eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, model(batch).logits)


def test_bad_configs_name_the_key(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bogus"):
        build_stage("stage2", _params(data_dir, bogus=1))
    with pytest.raises(ValueError, match="nope"):
        build_stage("stage2", _params(data_dir, model={"nope": 1}))
    with pytest.raises(ValueError, match="ranq"):
        build_stage("stage3", _params(data_dir, lora={"ranq": 2}))
    with pytest.raises(FileNotFoundError, match="init_from"):
        build_stage("stage3", _params(data_dir, init_from=str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match="init_tokenizer"):
        build_stage("stage2", _params(data_dir, init_tokenizer=str(tmp_path / "missing")))
