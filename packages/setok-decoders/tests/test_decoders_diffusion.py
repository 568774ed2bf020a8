"""Diffusion decoder: eps loss falls, what is frozen stays frozen, save/load, sampling."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from setok_decoders.config import (
    DiffusionDecoderConfig,
    MapperConfig,
    NoiseScheduleConfig,
    tiny_unet_kwargs,
)
from setok_decoders.diffusion import SAMPLERS, DiffusionDecoder
from setok_decoders.io import load_image_decoder
from setok_decoders.trainable import set_trainable, trainable_parameter_names, trainable_table


def _config(**kw) -> DiffusionDecoderConfig:
    unet = tiny_unet_kwargs(sample_size=16, block_out_channels=[16, 32], cross_attention_dim=32)
    mapper = MapperConfig(
        token_dim=24, num_queries=4, hidden_size=32, num_heads=4, intermediate_size=64
    )
    base = dict(
        mapper=mapper,
        unet=unet,
        image_size=16,
        schedule=NoiseScheduleConfig(num_train_timesteps=100),
        cond_dropout=0.0,
    )
    base.update(kw)
    return DiffusionDecoderConfig(**base)


def _decoder(**kw) -> DiffusionDecoder:
    torch.manual_seed(0)
    return DiffusionDecoder(_config(**kw))


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 16, 16, generator=gen)
    tokens = torch.randn(2, 5, 24, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    return images, tokens, mask


def test_eps_loss_falls_when_overfitting_one_batch():
    dec = _decoder(train_unet="all")
    dec.apply_trainable()
    images, tokens, mask = _batch()
    opt = torch.optim.Adam([p for p in dec.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(12):  # fixed noise and timesteps: a pure overfit
        opt.zero_grad()
        loss = dec.loss(images, tokens, mask, generator=torch.Generator().manual_seed(7))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::8]


def test_frozen_parameters_stay_bit_identical():
    dec = _decoder(train_unet="cross_kv", cond_dropout=0.5)
    names = dec.apply_trainable()
    assert any("attn2.to_k" in n for n in names) and any("attn2.to_v" in n for n in names)
    assert not any("attn2.to_q" in n or "attn1" in n for n in names)
    assert "null_condition" in names and any(n.startswith("mapper.") for n in names)
    before = {n: p.detach().clone() for n, p in dec.named_parameters()}
    opt = torch.optim.AdamW([p for p in dec.parameters() if p.requires_grad], lr=1e-2)
    images, tokens, mask = _batch(1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        opt.zero_grad()
        dec.loss(images, tokens, mask, generator=gen).backward()
        opt.step()
    for name, param in dec.named_parameters():
        if name in names:
            continue
        assert torch.equal(param, before[name]), name
    changed = [n for n in names if not torch.equal(dict(dec.named_parameters())[n], before[n])]
    assert any("attn2.to_k" in n for n in changed) and any("mapper" in n for n in changed)
    table = trainable_table(dec)
    assert "unet.down_blocks" in table and "TOTAL" in table


def test_set_trainable_patterns():
    dec = _decoder(train_unet="none", train_mapper=False)
    assert dec.apply_trainable() == []
    assert not any(p.requires_grad for p in dec.parameters())
    names = trainable_parameter_names(dec, ["unet.conv_in.*"])
    assert names == ["unet.conv_in.weight", "unet.conv_in.bias"]
    with pytest.raises(ValueError, match="matches no parameter"):
        set_trainable(dec, ["unet.no_such_layer.*"])
    with pytest.raises(ValueError, match="train_unet"):
        _decoder(train_unet="keys").apply_trainable()


def test_condition_dropout_uses_null_condition():
    dec = _decoder()
    with torch.no_grad():
        dec.null_condition.normal_()
    _, tokens, mask = _batch()
    cond = dec.condition(tokens, mask)
    assert torch.equal(dec.condition(tokens, mask, drop_prob=0.0), cond)
    dropped = dec.condition(tokens, mask, drop_prob=0.999999)
    assert torch.equal(dropped, dec.null_condition.expand_as(cond))


def test_decode_shapes_range_and_samplers():
    dec = _decoder().eval()
    _, tokens, mask = _batch()
    for name in SAMPLERS:
        out = dec.decode(tokens, mask, num_steps=2, guidance_scale=2.0, sampler=name)
        assert out.shape == (2, 3, 16, 16), name
        assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all(), name
    a = dec.decode(tokens, mask, num_steps=3, generator=torch.Generator().manual_seed(1))
    b = dec.decode(tokens, mask, num_steps=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # key padding: padded token contents do not change the samples
    changed = tokens.clone()
    changed[~mask] = 30.0
    c = dec.decode(changed, mask, num_steps=3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(a, c, atol=1e-5)
    with pytest.raises(ValueError, match="sampler"):
        dec.decode(tokens, mask, num_steps=2, sampler="plms")


def test_save_load_identical_outputs(tmp_path):
    dec = _decoder().eval()
    with torch.no_grad():
        dec.null_condition.normal_()
    images, tokens, mask = _batch(2)
    dec.save_pretrained(tmp_path / "dd")
    again = DiffusionDecoder.from_pretrained(tmp_path / "dd").eval()
    assert isinstance(load_image_decoder(tmp_path / "dd"), DiffusionDecoder)  # by its kind
    assert again.config == dec.resolved_config()
    for model_a, model_b in ((dec, again),):
        la = model_a.loss(images, tokens, mask, generator=torch.Generator().manual_seed(5))
        lb = model_b.loss(images, tokens, mask, generator=torch.Generator().manual_seed(5))
        assert torch.equal(la, lb)
    gen = torch.Generator
    a = dec.decode(tokens, mask, num_steps=2, generator=gen().manual_seed(0))
    b = again.decode(tokens, mask, num_steps=2, generator=gen().manual_seed(0))
    assert torch.equal(a, b)


def test_pretrained_unet_and_vae_latent_space(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        block_out_channels=[8, 16],
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    vae.save_pretrained(tmp_path / "sd" / "vae")
    unet_kwargs = dict(_config().unet, in_channels=4, out_channels=4, sample_size=8)
    UNet2DConditionModel(**unet_kwargs).save_pretrained(tmp_path / "sd" / "unet")
    cfg = _config(unet_path=str(tmp_path / "sd"), vae_path=str(tmp_path / "sd"))
    dec = DiffusionDecoder(cfg)
    assert dec.latent_shape == (4, 8, 8)
    assert not any(p.requires_grad for p in dec.vae.parameters())
    images, tokens, mask = _batch()
    loss = dec.loss(images, tokens, mask, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and dec.vae.encoder.conv_in.weight.grad is None
    out = dec.eval().decode(tokens, mask, num_steps=2)
    assert out.shape == (2, 3, 16, 16) and out.min() >= 0 and out.max() <= 1
    dec.train()
    assert not dec.vae.training
    dec.save_pretrained(tmp_path / "ckpt")
    again = DiffusionDecoder.from_pretrained(tmp_path / "ckpt")
    assert again.config.unet_path is None and again.config.vae_path == str(tmp_path / "sd")
    assert torch.equal(again.vae.decoder.conv_out.weight, dec.vae.decoder.conv_out.weight)
    with pytest.raises(ValueError, match="in/out channels"):
        DiffusionDecoder(dataclasses.replace(cfg, unet_path=None))


def test_reconstruct_with_setok(tmp_path):
    from setok_tokenizer.config import EncoderConfig, SeTokConfig
    from setok_tokenizer.setok import SeTok

    torch.manual_seed(0)
    tok = SeTok(SeTokConfig(encoder=EncoderConfig(image_size=32))).eval()
    dec = _decoder()
    dec = DiffusionDecoder(
        _config(mapper=dataclasses.replace(dec.config.mapper, token_dim=tok.output_dim))
    ).eval()
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="tokenizer"):
        dec.reconstruct(images)
    dec.attach_tokenizer(tok)
    assert not any(k.startswith("_tokenizer") for k in dec.state_dict())
    out = dec.reconstruct(images, num_steps=2)
    assert out.shape == (2, 3, 16, 16) and out.min() >= 0 and out.max() <= 1


def test_bad_inputs_name_the_argument():
    dec = _decoder()
    images, tokens, mask = _batch()
    with pytest.raises(ValueError, match="images"):
        dec.loss(images[:, :, :8], tokens, mask)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dec.loss(images * 2 - 1, tokens, mask)
    with pytest.raises(ValueError, match="batch index 0"):
        dec.loss(images, tokens, torch.zeros_like(mask))
