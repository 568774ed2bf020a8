"""Atomic save/load of a decoder: `config.json` + `model.safetensors` in one directory.

Files are written to a temp name in the target directory and moved into place with
os.replace, so a killed job never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from setok_tokenizer.atomic import atomic_write_json, atomic_write_with

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_module(
    module: nn.Module,
    config: dict[str, Any],
    directory: str | os.PathLike[str],
    kind: str,
    exclude_prefixes: tuple[str, ...] = (),
) -> Path:
    """Save `config` (tagged with `kind`) and the module's state dict minus excluded keys."""
    out = Path(directory)
    state = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in module.state_dict().items()
        if not name.startswith(exclude_prefixes)
    }
    atomic_write_with(
        out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"kind": kind})
    )
    atomic_write_json(out / CONFIG_NAME, {"kind": kind, "config": config})
    return out


def load_config(directory: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    """Read a saved config, checking that the directory holds a `kind` decoder."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("kind") != kind:
        raise ValueError(f"{directory} holds a {data.get('kind')!r} checkpoint, not {kind!r}")
    return data["config"]


def load_weights(
    module: nn.Module,
    directory: str | os.PathLike[str],
    allow_missing_prefixes: tuple[str, ...] = (),
) -> None:
    """Load saved weights into `module`; only keys under `allow_missing_prefixes` may be absent."""
    state = load_file(str(Path(directory) / WEIGHTS_NAME))
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(allow_missing_prefixes)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {directory} does not fit the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a parameterless module)."""
    for param in module.parameters():
        return param.device
    return torch.device("cpu")


def load_image_decoder(directory: str | os.PathLike[str]) -> nn.Module:
    """The image decoder saved in `directory`, by the kind its config names: a diffusion
    decoder or a token painter (both `decode(tokens, token_mask, ...)` to [0, 1] images)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    kind = json.loads(path.read_text(encoding="utf-8")).get("kind")
    if kind == "token_painter":
        from setok_decoders.painter import TokenPainter

        return TokenPainter.from_pretrained(directory)
    from setok_decoders.diffusion import DiffusionDecoder

    return DiffusionDecoder.from_pretrained(directory)  # names any other kind in its error
