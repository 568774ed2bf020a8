"""Stage I (setokim.stages.stage1): sub-phases, frozen modules, losses, checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from setok_decoders.config import tiny_unet_kwargs
from setokim.stages.stage1 import (
    build,
    export_parts,
    load_parts,
    load_stage1_checkpoint,
)
from setokim.train import TrainerConfig, train
from setokim.train.rng import seed_all

# 32 px images, a 4x4 grid; 16 px decoder with cross-attention at 8x8: fast on one CPU core.
TINY_DECODER: dict[str, Any] = {
    "diffusion": {
        "image_size": 16,
        "unet": tiny_unet_kwargs(
            sample_size=16,
            block_out_channels=[16, 32],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            cross_attention_dim=32,
        ),
        "mapper": {"num_queries": 4, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                   "intermediate_size": 64},
        "cond_dropout": 0.0,
        "num_inference_steps": 3,
    },
    "mask": {"hidden_dim": 32, "num_layers": 1, "num_heads": 2, "mask_scale": 2},
}  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stage1") / "shapes"


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _params(data_dir: Path, **kw: Any) -> dict[str, Any]:
    return {
        "tokenizer": {"encoder": {"image_size": 32}, "clustering": {"max_clusters": 4}},
        "decoder": TINY_DECODER,
        "data": {"shard_dir": str(data_dir), "image_size": 32},
        "generate_train": 16,
        "generate_image_size": 32,
        "cpu_threads": 1,
        **kw,
    }


def _stage(data_dir: Path, **kw: Any):
    return build(_params(data_dir, **kw))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _eval_loss(stage, model, batch, seed: int = 123) -> tuple[float, dict[str, float]]:
    torch.manual_seed(seed)  # same noise and timesteps before and after training
    with torch.no_grad():
        loss, metrics = stage.loss(model, batch)
    return float(loss), metrics


def _fit(stage, model, batch, steps: int, lr: float) -> None:
    opt = torch.optim.AdamW(stage.trainable(model), lr=lr, weight_decay=0.0)
    for step in range(steps):
        torch.manual_seed(step)
        loss, _ = stage.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_subphase1_trains_merger_mapper_cross_kv_only(data_dir: Path, capsys) -> None:
    stage = _stage(data_dir, decoder={**TINY_DECODER})
    model = stage.build_model()
    assert "Stage I sub-phase 1: trainable parameters" in capsys.readouterr().out
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("setok.merger.") for n in names)
    assert any(n.startswith("diffusion.mapper.") for n in names)
    unet = [n for n in names if n.startswith("diffusion.unet.")]
    assert unet and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in unet)
    assert not any(n.startswith(("setok.encoder.", "mask_decoder.")) for n in names)

    batch = next(stage.batches(0, 1, 0, 2))
    assert batch["subphase"] == 1 and batch["pixels"].shape == (2, 3, 32, 32)
    before = _snapshot(model)
    first, metrics = _eval_loss(stage, model, batch)
    assert set(metrics) == {"diffusion", "subphase"}
    _fit(stage, model, batch, steps=8, lr=2e-2)
    after = _snapshot(model)
    last, _ = _eval_loss(stage, model, batch)
    assert last < first
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        if name in names:
            continue
        assert not changed, f"frozen parameter {name} moved"
    assert any(not torch.equal(before[n], after[n]) for n in names if ".attn2.to_k." in n)
    assert any(not torch.equal(before[n], after[n]) for n in names if "merger" in n)


# A fixed kernel: on a 4x4 grid of untrained features the adaptive one finds one peak, and
# the KL of a single cluster is 0 (nothing to match), so the KL tests fix the kernel.
FIXED_KERNEL = {
    "encoder": {"image_size": 32},
    "clustering": {"max_clusters": 4, "kernel_scale": 2.8},
}


def test_subphase2_adds_mask_decoder_and_its_losses_fall(data_dir: Path) -> None:
    stage = _stage(data_dir, subphase=2, tokenizer=FIXED_KERNEL, group_weight=1.0)
    model = stage.build_model()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("mask_decoder.") for n in names)
    assert any(n.startswith("setok.encoder.") for n in names)
    batch = next(stage.batches(0, 1, 0, 2))
    assert batch["subphase"] == 2
    _, m0 = _eval_loss(stage, model, batch)
    assert {"mask", "kl", "bce", "dice", "diffusion", "group"} <= set(m0)
    _fit(stage, model, batch, steps=8, lr=1e-2)
    _, m1 = _eval_loss(stage, model, batch)
    for key in ("kl", "bce", "dice", "mask", "diffusion"):
        assert m1[key] < m0[key], (key, m0[key], m1[key])


def test_kl_alone_reaches_the_encoder_through_hard_masks(data_dir: Path) -> None:
    stage = _stage(
        data_dir,
        subphase=2,
        tokenizer=FIXED_KERNEL,
        diffusion_weight=0.0,
        bce_weight=0.0,
        dice_weight=0.0,
    )
    model = stage.build_model()
    assert model.setok.cfg.clustering.assignment == "hard"
    batch = next(stage.batches(0, 1, 0, 4))
    loss, metrics = stage.loss(model, batch)
    assert metrics["kl"] > 0
    loss.backward()
    grads = [p.grad for p in model.setok.encoder.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_grouping_term_alone_trains_the_encoder(data_dir: Path) -> None:
    weights = dict(diffusion_weight=0.0, mask_weight=0.0, group_weight=1.0)
    stage = _stage(data_dir, subphase=2, **weights)
    model = stage.build_model()
    batch = next(stage.batches(0, 1, 0, 4))
    _, m0 = _eval_loss(stage, model, batch)
    _fit(stage, model, batch, steps=10, lr=1e-2)
    _, m1 = _eval_loss(stage, model, batch)
    assert m1["group"] < m0["group"] and m0["group"] > 0
    off = _stage(data_dir, subphase=2, diffusion_weight=0.0, mask_weight=0.0, group_weight=0.0)
    loss, metrics = off.loss(off.build_model(), batch)
    assert float(loss) == 0.0 and metrics["group"] > 0  # measured, not trained


def test_subphase2_batch_without_object_masks_is_an_error(data_dir: Path) -> None:
    stage = _stage(data_dir, subphase=2)
    model = stage.build_model()
    batch = dict(next(stage.batches(0, 1, 0, 2)))
    batch["object_valid"] = torch.zeros_like(batch["object_valid"])
    with pytest.raises(ValueError, match="without any object mask"):
        stage.loss(model, batch)


def test_combined_run_tags_batches_and_gates_the_encoder(data_dir: Path) -> None:
    stage = _stage(data_dir, subphase=2, subphase1_batches=3)
    assert [stage.subphase_at(p) for p in range(5)] == [1, 1, 1, 2, 2]
    tags = [b["subphase"] for _, b in zip(range(5), stage.batches(0, 1, 1, 4), strict=False)]
    assert tags == [1, 1, 2, 2, 2]  # resumed at position 1
    model = stage.build_model()
    batch = next(stage.batches(0, 1, 0, 4))
    loss, metrics = stage.loss(model, batch)
    assert "mask" not in metrics
    loss.backward()
    assert all(p.grad is None for p in model.setok.encoder.parameters())
    assert all(p.grad is None for p in model.mask_decoder.parameters())
    assert any(p.grad is not None for p in model.setok.merger.parameters())


def test_checkpoint_init_from_export_and_load(data_dir: Path, tmp_path: Path) -> None:
    stage = _stage(data_dir)
    cfg = TrainerConfig(max_steps=2, micro_batch_size=2, lr=1e-2, progress=False, log_every=1)
    result = train(stage, cfg, tmp_path / "run1")
    assert result.checkpoint is not None and result.step == 2
    _, loaded = load_stage1_checkpoint(tmp_path / "run1")
    seed_all(cfg.seed)  # the loop's initialisation
    fresh = stage.build_model()
    trained = {k: v for k, v in loaded.state_dict().items()}
    moved = [k for k, v in fresh.state_dict().items() if not torch.equal(v, trained[k])]
    assert moved and all(k.startswith(("setok.merger.", "diffusion.")) for k in moved)

    phase2 = _stage(data_dir, subphase=2, init_from=str(result.checkpoint))
    model2 = phase2.build_model()
    for key, value in model2.state_dict().items():
        assert torch.equal(value, trained[key]), key

    export_parts(loaded, tmp_path / "parts")
    back = load_parts(tmp_path / "parts")
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key
    pixels = torch.rand(2, 3, 32, 32)
    torch.manual_seed(0)
    a = loaded(pixels)["diffusion"]
    torch.manual_seed(0)
    b = back(pixels)["diffusion"]
    assert torch.equal(a, b)


def test_bad_configs_name_the_key(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="subphase"):
        _stage(data_dir, subphase=3)
    with pytest.raises(ValueError, match="subphase1_batches"):
        _stage(data_dir, subphase1_batches=2)
    with pytest.raises(ValueError, match="unknown config key"):
        build({**_params(data_dir), "lr": 1.0})
    with pytest.raises(ValueError, match="init_from"):
        _stage(data_dir, init_from=str(data_dir / "nope"))
    with pytest.raises(ValueError, match="decoder"):
        _stage(data_dir, decoder={"vae": {}})
    bad = {**TINY_DECODER, "mask": {**TINY_DECODER["mask"], "token_dim": 7}}
    with pytest.raises(ValueError, match="decoder.mask"):
        _stage(data_dir, decoder=bad).build_model()
    stage = _stage(data_dir, subphase=2)
    model = stage.build_model()
    batch = next(stage.batches(0, 1, 0, 2))
    with pytest.raises(ValueError, match="object_masks"):
        stage.loss(model, {**batch, "object_masks": None})


def _two_object_batch(n: int = 4, size: int = 32) -> dict[str, Any]:
    """Left and right halves in two random colours per image: two objects, no background."""
    g = torch.Generator().manual_seed(0)
    colours = torch.rand(n, 2, 3, generator=g)
    pixels = torch.empty(n, 3, size, size)
    pixels[..., : size // 2] = colours[:, 0, :, None, None]
    pixels[..., size // 2 :] = colours[:, 1, :, None, None]
    masks = torch.zeros(n, 2, size, size)
    masks[:, 0, :, : size // 2] = 1.0
    masks[:, 1, :, size // 2 :] = 1.0
    valid = torch.ones(n, 2, dtype=torch.bool)
    return {"pixels": pixels, "object_masks": masks, "object_valid": valid, "subphase": 2}


@pytest.mark.slow
def test_two_object_toy_keeps_two_clusters_over_many_steps(data_dir: Path) -> None:
    """The sub-phase-2 encoder objective of +exp=stage1_shapes never merges the two objects."""
    tokenizer = {
        "encoder": {"image_size": 32, "overrides": {"patch_size": 4}},
        "clustering": {"max_clusters": 6, "knn_k": 3},
    }
    stage = _stage(
        data_dir,
        subphase=2,
        tokenizer=tokenizer,
        diffusion_weight=0.0,
        mask_weight=0.0,
        kl_weight=0.0,
        group_weight=1.0,
    )
    model = stage.build_model()
    batch = _two_object_batch()
    opt = torch.optim.AdamW(stage.trainable(model), lr=2e-3)
    counts = []
    for step in range(1, 121):
        loss, _ = stage.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 40 == 0:
            with torch.no_grad():
                out = model.setok(model.setok.preprocess(batch["pixels"]))
            counts.append(out.num_tokens.tolist())
            left = out.masks[:, :, :, :4].argmax(1).flatten(1)
            right = out.masks[:, :, :, 4:].argmax(1).flatten(1)
            assert (left == left[:, :1]).all() and (right == right[:, :1]).all()
            assert (left[:, 0] != right[:, 0]).all()
    assert counts == [[2, 2, 2, 2]] * 3, counts


def _check_stage2_image_decoder(export: Path, data_dir: Path) -> None:
    """Stage II records the painter as the decoder when asked, and names a missing one."""
    from setokim.stages.stage2 import Stage2Config, Stage2Stage

    def fields(choice: str, init: Path) -> dict:
        cfg = Stage2Config(init_tokenizer=str(init), image_decoder=choice)
        return Stage2Stage(cfg).export_fields()

    assert fields("painter", export)["decoder_path"] == str((export / "painter").resolve())
    assert fields("diffusion", export)["decoder_path"] == str((export / "diffusion").resolve())
    bare = data_dir.parent / "parts_bare"
    shutil.copytree(export, bare, ignore=shutil.ignore_patterns("painter"))
    with pytest.raises(ValueError, match="painter_weight > 0"):
        fields("painter", bare)
    with pytest.raises(ValueError, match="image_decoder"):
        Stage2Config(image_decoder="vae")


def test_painter_trains_with_its_weight_and_is_absent_without(data_dir: Path) -> None:
    weights = dict(diffusion_weight=0.0, mask_weight=0.0, group_weight=0.0)
    stage = _stage(data_dir, subphase=2, painter_weight=1.0,
                   decoder={**TINY_DECODER, "painter": {"image_size": 8, "hidden_dim": 16}},
                   **weights)  # fmt: skip
    model = stage.build_model()
    assert model.painter is not None and model.painter.config.image_size == 8
    assert all(p.requires_grad for p in model.painter.parameters())
    batch = next(stage.batches(0, 1, 0, 4))
    loss0, m0 = _eval_loss(stage, model, batch)
    assert loss0 == pytest.approx(m0["painter"]) and m0["painter"] > 0
    merger0 = _snapshot(model.setok.merger)
    _fit(stage, model, batch, steps=10, lr=1e-2)
    _, m1 = _eval_loss(stage, model, batch)
    assert m1["painter"] < m0["painter"]
    assert any(not torch.equal(v, dict(model.setok.merger.named_parameters())[k])
               for k, v in merger0.items())  # fmt: skip  # reconstruction reaches the tokens
    assert _stage(data_dir, subphase=2).build_model().painter is None
    # exported beside the other parts, it is the image decoder Stage II may choose
    export_parts(model, data_dir.parent / "parts_painter")
    back = load_parts(data_dir.parent / "parts_painter")
    assert back.painter is not None
    for key, value in model.painter.state_dict().items():
        assert torch.equal(value, back.painter.state_dict()[key]), key
    _check_stage2_image_decoder(data_dir.parent / "parts_painter", data_dir)
    with pytest.raises(ValueError, match="painter_weight"):
        _stage(data_dir, painter_weight=-1.0)
    with pytest.raises(ValueError, match="decoder.painter"):
        _stage(data_dir, painter_weight=1.0,
               decoder={**TINY_DECODER, "painter": {"hidden_dimm": 4}}).build_model()  # fmt: skip


def test_subphase0_pretrains_the_encoder_to_name_objects(data_dir: Path) -> None:
    stage = _stage(data_dir, subphase=2, subphase0_batches=2, subphase1_batches=1,
                   attribute_weight=0.5)  # fmt: skip
    assert [stage.subphase_at(p) for p in range(5)] == [0, 0, 1, 2, 2]
    model = stage.build_model()
    assert model.attributes is not None
    batch = next(stage.batches(0, 1, 0, 4))
    assert batch["subphase"] == 0 and set(batch["attribute_labels"]) == {"colour", "shape"}
    loss, metrics = stage.loss(model, batch)
    assert set(metrics) == {"attributes", "subphase"} and float(loss) == metrics["attributes"]
    loss.backward()  # only the encoder and the heads learn in sub-phase 0
    assert all(p.grad is not None for p in model.attributes.parameters())
    assert any(p.grad is not None for p in model.setok.encoder.parameters())
    for part in (model.setok.merger, model.diffusion, model.mask_decoder):
        assert all(p.grad is None for p in part.parameters())
    model.zero_grad(set_to_none=True)
    first = _eval_loss(stage, model, batch)[0]
    _fit(stage, model, batch, steps=15, lr=1e-2)
    assert _eval_loss(stage, model, batch)[0] < 0.5 * first

    # sub-phase 2: the attribute term joins with its weight
    later = dict(next(stage.batches(0, 1, 3, 4)))
    assert later["subphase"] == 2
    loss, m = _eval_loss(stage, model, later)
    assert m["attributes"] > 0
    want = m["diffusion"] + m["mask"] + 0.5 * m["attributes"]
    assert loss == pytest.approx(want, rel=1e-5)

    # the naming term on the tokens: heads of their own over the token width
    named = _stage(data_dir, subphase=2, token_attribute_weight=2.0)
    model = named.build_model()
    assert model.token_attributes is not None and model.attributes is not None
    batch = next(named.batches(0, 1, 0, 4))
    loss, m = _eval_loss(named, model, batch)
    assert m["token_attributes"] > 0
    want = m["diffusion"] + m["mask"] + 2.0 * m["token_attributes"]
    assert loss == pytest.approx(want, rel=1e-5)
    loss, _ = named.loss(model, batch)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.setok.merger.parameters())  # fmt: skip
    with pytest.raises(ValueError, match="token_attribute_weight"):
        _stage(data_dir, token_attribute_weight=-1.0)

    plain = _stage(data_dir, subphase=2)
    assert plain.build_model().attributes is None
    assert "attribute_labels" not in next(plain.batches(0, 1, 0, 4))
    with pytest.raises(ValueError, match="subphase0_batches"):
        _stage(data_dir, subphase0_batches=-1)
