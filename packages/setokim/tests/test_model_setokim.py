"""SeTokIM end to end on a tiny random model: packing with real SeTok token counts, the
Stage II objective with a frozen regression target, LoRA, and save/load."""

from __future__ import annotations

import copy

import pytest
import torch

from setokim.model.config import LoRAConfig, SeTokIMConfig
from setokim.model.lora import apply_lora, lora_state_dict
from setokim.model.losses import setokim_loss, stage_loss
from setokim.model.packing import Image, Sample, Text
from setokim.model.setokim import SeTokIM


def _cfg() -> SeTokIMConfig:
    cfg = SeTokIMConfig()
    cfg.tokenizer.clustering.max_clusters = 8
    return cfg


@pytest.fixture(scope="module")
def base() -> SeTokIM:
    return SeTokIM.from_config(_cfg())


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 64, generator=g)


def _samples() -> list[Sample]:
    imgs = _images(3)
    return [
        Sample([Text("a b c", train=True)]),
        Sample([Text("look"), Image(0), Text("a red circle", train=True)], imgs[:1]),
        Sample(
            [Image(0), Text("then"), Image(1), Text("make it blue"), Image(2, output=True)],
            imgs,
        ),
    ]


def test_forward_uses_setok_token_counts(base):
    layout = base.collate(_samples())
    out = base(layout)
    num = base.vision_tokenizer(base.preprocess(layout.pixels)).num_tokens
    totals = [0, int(num[0]), int(num[1:].sum())]
    assert out.packed.seq_len.tolist() == [int(layout.text_len[b]) + totals[b] for b in range(3)]
    B, T = out.packed.labels.shape
    assert out.logits.shape == (B, T, len(base.text_tokenizer))
    assert out.hidden.shape == (B, T, base.config.llm.hidden_size)
    # visual positions hold projected SeTok tokens
    proj = base.projector(out.visual.tokens[out.visual.token_mask])
    torch.testing.assert_close(
        out.packed.inputs_embeds[out.packed.visual_batch, out.packed.visual_pos], proj
    )
    assert int(out.packed.visual_output.sum()) == int(num[2])


def test_stage2_step_keeps_the_regression_target_frozen(base):
    model = copy.deepcopy(base)
    model.train()
    assert not model.vision_tokenizer.training
    layout = model.collate(_samples())
    before_tok = {k: v.clone() for k, v in model.vision_tokenizer.state_dict().items()}
    before_llm = {k: v.clone() for k, v in model.llm.state_dict().items()}
    before_head = model.regression_head[0].weight.clone()
    targets = model.encode_images(layout.pixels).tokens.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss, metrics = stage_loss(model, layout)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.vision_tokenizer.parameters())
        opt.step()
        losses.append(metrics)
    assert all(not p.requires_grad for p in model.vision_tokenizer.parameters())
    for k, v in model.vision_tokenizer.state_dict().items():
        assert torch.equal(v, before_tok[k]), k
    assert torch.equal(model.encode_images(layout.pixels).tokens, targets)
    assert not torch.equal(model.regression_head[0].weight, before_head)
    assert any(not torch.equal(v, before_llm[k]) for k, v in model.llm.state_dict().items())
    assert losses[-1]["lm_loss"] < losses[0]["lm_loss"]
    assert losses[-1]["regression_loss"] < losses[0]["regression_loss"]
    assert losses[0]["visual_targets"] > 0 and losses[0]["text_targets"] > 0


def test_loss_weights_and_text_only_batches(base):
    layout = base.collate([Sample([Text("only text here", train=True)])])
    out = base(layout)
    loss, metrics = setokim_loss(base, out, lm_weight=2.0, regression_weight=5.0)
    assert metrics["visual_targets"] == 0 and metrics["regression_loss"] == 0.0
    torch.testing.assert_close(loss.detach(), torch.tensor(2.0 * metrics["lm_loss"]))


def test_lora_trains_only_adapters(base):
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(enabled=True, rank=4, alpha=8, dropout=0.0))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any("q_proj" in n for n in names) and any("v_proj" in n for n in names)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    layout = model.collate(_samples())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss, _ = stage_loss(model, layout)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k]), k
    lora_b = [v for k, v in lora_state_dict(model).items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(copy.deepcopy(base), LoRAConfig(enabled=True, target_modules=["nope_proj"]))


def test_lora_keeps_chosen_heads_trainable(base):
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(enabled=True, train_heads=["regression_head"]))
    assert all(p.requires_grad for p in model.regression_head.parameters())
    assert not any(p.requires_grad for p in model.projector.parameters())


def test_save_and_load_round_trip(base, tmp_path):
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.projector[0].weight.add_(0.5)  # make it differ from a fresh build
    target = model.save_pretrained(tmp_path / "ckpt")
    assert (target / "model.safetensors").is_file() and (target / "setok").is_dir()
    loaded = SeTokIM.from_pretrained(target)
    layout = model.collate(_samples())
    torch.testing.assert_close(loaded(layout).logits, model(layout).logits)


def test_bad_inputs_raise_clear_errors(base):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        small = copy.deepcopy(base)
        small.llm.config.max_position_embeddings = 4
        small(small.collate(_samples()))
    with pytest.raises(ValueError, match=r"samples\[0\] refers to image 1"):
        base.collate([Sample([Image(1)], _images(1))])


def test_visual_geometry_starts_neutral_and_marks_input_images_only(base, tmp_path):
    cfg = _cfg()
    cfg.visual_geometry = True
    model = SeTokIM.from_config(cfg)
    layout = model.collate(_samples())
    # zero at the start: the same model as without it
    torch.testing.assert_close(model(layout).logits, base(layout).logits)
    with torch.no_grad():
        model.geometry_embed.weight.normal_()
    out, plain = model(layout), base(layout)
    assert out.visual.geometry.shape[:2] == out.visual.tokens.shape[:2]
    packed = out.packed
    moved = (packed.inputs_embeds - plain.packed.inputs_embeds).abs().amax(-1).detach()
    at_visual = moved[packed.visual_batch, packed.visual_pos]
    assert bool((at_visual[~packed.visual_output] > 0).all())  # input images' tokens move
    assert bool((at_visual[packed.visual_output] == 0).all())  # generated images' do not
    text = torch.ones_like(moved, dtype=torch.bool)
    text[packed.visual_batch, packed.visual_pos] = False
    assert float(moved[text].max()) == 0.0
    loaded = SeTokIM.from_pretrained(model.save_pretrained(tmp_path / "geometry"))
    torch.testing.assert_close(loaded(layout).logits, out.logits)
    apply_lora(model, LoRAConfig(enabled=True, train_heads=["projector", "geometry_embed"]))
    assert all(p.requires_grad for p in model.geometry_embed.parameters())
