"""ConvNeXt vision towers from the public OpenCLIP checkpoint format, read from a local folder.

The paper's second encoder, ConvNeXt-XXL, is published as an OpenCLIP checkpoint (a folder
with `open_clip_config.json` and `open_clip_pytorch_model.bin` or
`open_clip_model.safetensors`, as on the model hubs), not as a transformers checkpoint.
`open_clip_torch` (the `openclip` extra of setok-tokenizer) builds the CLIP model from that
folder and loads its weights (`local-dir:` schema: nothing downloads); the timm ConvNeXt
trunk of its vision tower is then copied into a transformers `ConvNextModel`, the class the
`convnext` encoder family runs, with the trunk's layer-norm epsilon (ConvNeXt-XXL: 1e-5,
transformers hard-codes 1e-6) recorded in the config as `norm_eps` and restored on every
load. Pixel mean/std come from the checkpoint's `preprocess_cfg` (`open_clip_normalisation`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

OPEN_CLIP_CONFIG = "open_clip_config.json"
# timm activation name -> transformers ACT2FN name (the same function)
_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}


def is_open_clip_dir(path: str | os.PathLike[str]) -> bool:
    """True for a folder in the OpenCLIP checkpoint format (it has open_clip_config.json)."""
    return (Path(path) / OPEN_CLIP_CONFIG).is_file()


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(
            "loading an OpenCLIP checkpoint needs open_clip_torch: "
            "pip install 'setok-tokenizer[openclip]'"
        ) from err
    return open_clip


def _activation(block: nn.Module, where: str) -> str:
    act = block.mlp.act
    name = type(act).__name__.lower()
    approximate = getattr(act, "approximate", "none")
    if name == "gelu":
        key = "gelu_tanh" if approximate == "tanh" else "gelu"
    elif name == "geludtanh" or name == "gelutanh":
        key = "gelu_tanh"
    elif name == "silu":
        key = "silu"
    else:
        raise ValueError(f"{where}: ConvNeXt activation {type(act).__name__} is not supported")
    return _ACTIVATIONS[key]


def _check_supported(trunk: nn.Module, where: str) -> None:
    from timm.models.convnext import ConvNeXt

    if not isinstance(trunk, ConvNeXt):
        raise ValueError(
            f"{where}: the vision tower is a {type(trunk).__name__}, only timm ConvNeXt towers "
            "load as the convnext encoder family"
        )
    for i, stage in enumerate(trunk.stages):
        for j, block in enumerate(stage.blocks):
            if not isinstance(block.mlp.fc1, nn.Linear) or block.conv_dw.kernel_size != (7, 7):
                raise ValueError(
                    f"{where}: stage {i} block {j} is not a 7x7 ConvNeXt block with linear MLP "
                    "(conv_mlp / other kernel sizes have no transformers ConvNextModel equal)"
                )
            if block.mlp.fc1.out_features != 4 * block.mlp.fc1.in_features:
                raise ValueError(f"{where}: stage {i} block {j} has an MLP ratio other than 4")


def _hf_state(trunk: nn.Module) -> dict[str, Tensor]:
    """The timm ConvNeXt trunk's weights under transformers ConvNextModel's names."""
    out: dict[str, Tensor] = {
        "embeddings.patch_embeddings.weight": trunk.stem[0].weight,
        "embeddings.patch_embeddings.bias": trunk.stem[0].bias,
        "embeddings.layernorm.weight": trunk.stem[1].weight,
        "embeddings.layernorm.bias": trunk.stem[1].bias,
    }
    for i, stage in enumerate(trunk.stages):
        pre = f"encoder.stages.{i}"
        if i > 0:
            norm, conv = stage.downsample[0], stage.downsample[1]
            out.update({
                f"{pre}.downsampling_layer.0.weight": norm.weight,
                f"{pre}.downsampling_layer.0.bias": norm.bias,
                f"{pre}.downsampling_layer.1.weight": conv.weight,
                f"{pre}.downsampling_layer.1.bias": conv.bias,
            })  # fmt: skip
        for j, block in enumerate(stage.blocks):
            b = f"{pre}.layers.{j}"
            out.update({
                f"{b}.dwconv.weight": block.conv_dw.weight, f"{b}.dwconv.bias": block.conv_dw.bias,
                f"{b}.layernorm.weight": block.norm.weight, f"{b}.layernorm.bias": block.norm.bias,
                f"{b}.pwconv1.weight": block.mlp.fc1.weight, f"{b}.pwconv1.bias": block.mlp.fc1.bias,
                f"{b}.pwconv2.weight": block.mlp.fc2.weight, f"{b}.pwconv2.bias": block.mlp.fc2.bias,
            })  # fmt: skip
            if block.gamma is not None:
                out[f"{b}.layer_scale_parameter"] = block.gamma
    return {k: v.detach().clone() for k, v in out.items()}


def set_norm_eps(model: nn.Module, eps: float) -> None:
    """Give every layer norm of a transformers ConvNextModel's trunk `eps` (its config's
    `norm_eps`): transformers builds them with a fixed 1e-6."""
    from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm

    for module in model.modules():
        if isinstance(module, ConvNextLayerNorm):
            module.eps = eps


def open_clip_normalisation(path: str | os.PathLike[str]) -> tuple[list[float], list[float]]:
    """Pixel (mean, std) of an OpenCLIP checkpoint folder: its `preprocess_cfg`, else
    OpenCLIP's default (OpenAI CLIP's)."""
    raw = json.loads((Path(path) / OPEN_CLIP_CONFIG).read_text(encoding="utf-8"))
    pre = raw.get("preprocess_cfg") or {}
    if "mean" in pre and "std" in pre:
        return [float(m) for m in pre["mean"]], [float(s) for s in pre["std"]]
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return list(OPENAI_DATASET_MEAN), list(OPENAI_DATASET_STD)


def load_open_clip_convnext(path: str | os.PathLike[str]) -> nn.Module:
    """The transformers ConvNextModel of an OpenCLIP checkpoint folder's ConvNeXt tower.

    The weights are read by open_clip from the folder alone (`local-dir:`); an error names
    the folder and what does not fit (another tower type, a block transformers cannot run).
    """
    from transformers import ConvNextConfig, ConvNextModel

    root = Path(path)
    where = f"OpenCLIP checkpoint {root}"
    if not is_open_clip_dir(root):
        raise FileNotFoundError(f"{where}: no {OPEN_CLIP_CONFIG}")
    open_clip = _open_clip()
    clip = open_clip.create_model(
        f"local-dir:{root}", pretrained_text=False, pretrained_image=False, device="cpu",
        require_pretrained=True,
    )  # fmt: skip
    trunk = getattr(clip.visual, "trunk", None)
    if trunk is None:
        raise ValueError(
            f"{where}: the vision tower is a {type(clip.visual).__name__}, only timm ConvNeXt "
            "towers load as the convnext encoder family"
        )
    _check_supported(trunk, where)
    first = trunk.stages[0].blocks[0]
    raw = json.loads((root / OPEN_CLIP_CONFIG).read_text(encoding="utf-8"))
    image_size = raw.get("model_cfg", raw).get("vision_cfg", {}).get("image_size", 224)
    config = ConvNextConfig(
        num_channels=trunk.stem[0].in_channels,
        patch_size=trunk.stem[0].kernel_size[0],
        num_stages=len(trunk.stages),
        hidden_sizes=[len(s.blocks[0].norm.weight) for s in trunk.stages],
        depths=[len(s.blocks) for s in trunk.stages],
        hidden_act=_activation(first, where),
        layer_scale_init_value=1.0 if first.gamma is not None else 0.0,
        image_size=int(image_size if isinstance(image_size, int) else image_size[0]),
    )
    config.norm_eps = float(first.norm.eps)
    model = ConvNextModel(config)
    missing, unexpected = model.load_state_dict(_hf_state(trunk), strict=False)
    missing = [k for k in missing if not k.startswith(("layernorm.", "pooler."))]
    if missing or unexpected:
        raise ValueError(
            f"{where}: weights do not map: missing {missing[:5]}, extra {unexpected[:5]}"
        )
    set_norm_eps(model, config.norm_eps)
    return model.eval()
