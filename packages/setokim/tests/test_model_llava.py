"""SeTok inside a tiny LLaVA-format checkpoint (paper Table 9)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from setokim.model.llava_adapter import SeTokLlava, SeTokLlavaConfig
from setokim.model.text_tokenizer import build_text_tokenizer


def _tiny_llava(tok) -> LlavaForConditionalGeneration:
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tok),
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg)


@pytest.fixture()
def parts():
    tok = build_text_tokenizer()
    return _tiny_llava(tok), tok


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(n, 3, 32, 32)
    img[:, 0, :16] = 1.0  # two flat halves: clustering should find few regions
    img[:, 2, 16:] = 1.0
    return (img + 0.05 * torch.rand(n, 3, 32, 32, generator=g)).clamp(0, 1)


def test_tokens_are_projected_cluster_means(parts):
    llava, tok = parts
    model = SeTokLlava(llava, tok, SeTokLlavaConfig(max_clusters=8)).eval()
    pixels = _images(2)
    feats = model.patch_features(pixels)
    assert feats.shape == (2, 16, 32)  # CLS dropped, 4x4 patches
    tokens, valid, masks = model.cluster_means(feats)
    assert (masks.sum(1) == 1).all()  # hard: every patch in exactly one cluster
    assert 1 <= int(valid.sum(1).max()) < 16
    emb, valid2 = model.visual_embeds(pixels)
    proj = llava.model.multi_modal_projector
    for b in range(2):
        for k in range(int(valid[b].sum())):
            members = masks[b, k].bool()
            ref = proj(feats[b, members].mean(0))
            torch.testing.assert_close(emb[b, k], ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(valid, valid2)


def test_patch_connector_keeps_one_token_per_patch(parts):
    llava, tok = parts
    setok = SeTokLlava(llava, tok, SeTokLlavaConfig(max_clusters=8)).eval()
    patch = SeTokLlava(llava, tok, SeTokLlavaConfig(use_setok=False)).eval()
    sample = [setok.sample("look <image> what is it?", _images(1))]
    n_setok = int(setok.embed(setok.collate(sample)).seq_len[0])
    n_patch = int(patch.embed(patch.collate(sample)).seq_len[0])
    n_text = int(setok.collate(sample).text_len[0])
    assert n_patch == n_text + 16
    assert n_text < n_setok < n_patch
    # the patch arm reproduces the checkpoint's own connector output
    feats = patch.patch_features(_images(1))
    emb, _ = patch.visual_embeds(_images(1))
    torch.testing.assert_close(emb, llava.model.multi_modal_projector(feats))


def test_finetune_trains_projector_not_vision_tower(parts):
    llava, tok = parts
    model = SeTokLlava(llava, tok, SeTokLlavaConfig(max_clusters=8))
    layout = model.collate([model.sample("<image> color?", _images(1), answer="red and blue")])
    tower = {k: v.clone() for k, v in llava.model.vision_tower.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(10):
        loss, _, _ = model(layout)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert llava.model.multi_modal_projector.linear_1.weight.grad is not None
    for k, v in llava.model.vision_tower.state_dict().items():
        assert torch.equal(v, tower[k]), k
    answers = model.generate(
        ["<image> color?", "no image here"], [_images(1), None], max_new_tokens=4
    )
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_loads_local_checkpoint_and_checks_markers(parts, tmp_path):
    llava, tok = parts
    llava.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = SeTokLlava.from_pretrained(tmp_path, SeTokLlavaConfig(max_clusters=4))
    ref = SeTokLlava(llava, tok, SeTokLlavaConfig(max_clusters=4))
    pixels = _images(1)
    torch.testing.assert_close(model.visual_embeds(pixels)[0], ref.visual_embeds(pixels)[0])
    with pytest.raises(ValueError, match="markers"):
        model.sample("two <image> <image>", _images(1))
    with pytest.raises(FileNotFoundError, match="LLaVA checkpoint path"):
        SeTokLlava.from_pretrained(tmp_path / "missing")
