"""ConvNeXt from the public OpenCLIP checkpoint format (ConvNeXt-XXL's), from a local folder:
a tiny randomly initialised open_clip ConvNeXt CLIP saved as the hub layout, loaded as the
convnext encoder family, gives the timm trunk's own features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from setok_tokenizer.config import EncoderConfig
from setok_tokenizer.encoders import VisionEncoder

open_clip = pytest.importorskip(
    "open_clip", reason="open_clip_torch missing: pip install 'setok-tokenizer[openclip]'"
)

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
CONVNEXT = {"timm_model_name": "test_convnext", "timm_model_pretrained": False,
            "timm_pool": "", "timm_proj": "linear", "image_size": 64}  # fmt: skip


def _save_open_clip(root: Path, vision_cfg: dict) -> torch.nn.Module:
    """A random CLIP in the layout of the hub's OpenCLIP checkpoints (config + .bin)."""
    torch.manual_seed(0)
    model_cfg = {"embed_dim": 32, "vision_cfg": vision_cfg, "text_cfg": TEXT}
    clip = open_clip.model.CLIP(**model_cfg)
    trunk = getattr(clip.visual, "trunk", None)
    with torch.no_grad():  # layer scale starts at 1e-6 (blocks near identity): make them count
        for name, p in trunk.named_parameters() if trunk is not None else []:
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    root.mkdir()
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": MEAN, "std": STD}}
    (root / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(clip.state_dict(), root / "open_clip_pytorch_model.bin")
    return clip


@pytest.mark.slow  # importing open_clip and timm alone takes seconds
def test_open_clip_convnext_loads_as_the_convnext_family(tmp_path: Path) -> None:
    clip = _save_open_clip(tmp_path / "convnext_clip", CONVNEXT)
    trunk = clip.visual.trunk.eval()
    enc = VisionEncoder(EncoderConfig(family="convnext", pretrained_path=str(tmp_path / "convnext_clip"),
                                      image_size=64, layer="last"))  # fmt: skip
    assert enc.grid_size == (2, 2) and enc.feature_dim == 64
    torch.testing.assert_close(enc.pixel_mean.flatten(), torch.tensor(MEAN))
    torch.testing.assert_close(enc.pixel_std.flatten(), torch.tensor(STD))
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = trunk.forward_features(pixels).permute(0, 2, 3, 1)
        got = enc(pixels)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    # penultimate: the second-to-last block of the last stage
    captured: list[torch.Tensor] = []
    hook = trunk.stages[-1].blocks[-2].register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        trunk.forward_features(pixels)
    hook.remove()
    pen = VisionEncoder(EncoderConfig(family="convnext", pretrained_path=str(tmp_path / "convnext_clip"),
                                      image_size=64, layer="penultimate"))  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(
            pen(pixels), captured[0].permute(0, 2, 3, 1), rtol=1e-4, atol=1e-5
        )

    # Saved as SeTok saves its encoder and loaded again: the trunk's eps (1e-5) is kept.
    enc.save_pretrained(tmp_path / "saved")
    again = VisionEncoder.from_pretrained(tmp_path / "saved")
    from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm

    norms = [m.eps for m in again.model.modules() if isinstance(m, ConvNextLayerNorm)]
    assert norms and set(norms) == {trunk.stem[1].eps} == {1e-5}
    with torch.no_grad():
        torch.testing.assert_close(again(pixels), want, rtol=1e-4, atol=1e-5)


def test_an_open_clip_vit_tower_is_refused_naming_the_folder(tmp_path: Path) -> None:
    vit = {"width": 32, "layers": 1, "patch_size": 8, "image_size": 32, "head_width": 16}
    _save_open_clip(tmp_path / "vit_clip", vit)
    with pytest.raises(ValueError, match=r"vit_clip.*only timm ConvNeXt towers"):
        VisionEncoder(EncoderConfig(family="convnext", pretrained_path=str(tmp_path / "vit_clip"),
                                    image_size=32))  # fmt: skip
