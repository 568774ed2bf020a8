"""SeTokIM on disk: full exports, and LoRA adapter exports that point at a full base export.

Full export (Stage II; Stage III with `full=True`, LoRA merged into the LLM weights):
    setokim_config.json   the SeTokIMConfig plus "llm_config" (the LLM's HF config)
    model.safetensors     every weight that training changes (LLM, projector, regression head)
    text_tokenizer/       the text tokenizer with SeTokIM's special tokens
    setok/                the frozen Stage I SeTok
A sharded full export (Stage II on several ranks, `sharded.export_checkpoint_weights`) has
`model.safetensors.index.json` and `model-0000r-of-0000W.safetensors` instead of
`model.safetensors`; everything here that reads a full export's weights reads either.

Adapter export (Stage III's default; megabytes instead of the LLM's gigabytes):
    setokim_config.json   as above, with `lora` enabled
    adapter_model.safetensors  peft's `get_peft_model_state_dict` of the LLM
    heads.safetensors     the SeTokIM modules named in `lora.train_heads`, in full
    adapter_base.json     {"base": the base export's path, "weights_sha256": {file: hash}}
    text_tokenizer/

Loading builds the LLM on the meta device and assigns it the export's tensors, read straight
onto the requested device (`assign_export_weights`; no random LLM, one copy of the weights).
Loading an adapter export loads the base export, injects LoRA (`lora.apply_lora`), then the
adapter and head weights. The base path is stored as given to `save_pretrained(base=...)` (by
default the absolute path of the export the model was loaded from); a relative one is read
relative to the adapter export's directory, so `base="../stage2"` keeps a pair of sibling
exports loadable after moving both. A moved base can be passed to
`from_pretrained(..., base=DIR)`; either way the base's safetensors files must hash to the
recorded sha256, else loading fails naming the base path.

CLI: `python -m setokim.model.export merge ADAPTER_DIR OUT_DIR` writes a merged full export.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from setok_tokenizer.config import from_dict
from setokim.model.config import SeTokIMConfig
from setokim.utils.io import write_dir_atomically

if TYPE_CHECKING:
    from setokim.model.setokim import SeTokIM

CONFIG_FILE = "setokim_config.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
HEADS_FILE = "heads.safetensors"
BASE_FILE = "adapter_base.json"
TEXT_TOKENIZER_DIR = "text_tokenizer"
SETOK_DIR = "setok"
ADAPTER_FORMAT = "setokim-lora-adapter/1"
FROZEN_PREFIXES = ("vision_tokenizer.", "image_decoder.", "mask_decoder.")

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


# ---- inspection ----------------------------------------------------------------------------
def is_adapter_export(directory: str | os.PathLike[str]) -> bool:
    """True for a directory written as an adapter export (it has `adapter_base.json`)."""
    return (Path(directory) / BASE_FILE).is_file()


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASH_CACHE:  # a process that saves and then loads hashes a base once
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def weights_sha256(directory: str | os.PathLike[str]) -> dict[str, str]:
    """sha256 of every safetensors file under an export (relative posix path -> hex digest):
    the base's LLM/head weights and its SeTok, the content an adapter export depends on."""
    root = Path(directory)
    files = sorted(p for p in root.rglob("*.safetensors") if p.is_file())
    return {p.relative_to(root).as_posix(): _file_sha256(p) for p in files}


def export_digest(directory: str | os.PathLike[str]) -> str:
    """One sha256 over an export's weights: its own safetensors files and, for an adapter
    export, the recorded base hashes (an eval fingerprint that needs no model in memory)."""
    root = Path(directory)
    digest = hashlib.sha256()
    for name, value in weights_sha256(root).items():
        digest.update(f"{name}={value}\n".encode())
    if is_adapter_export(root):
        base = json.loads((root / BASE_FILE).read_text(encoding="utf-8"))["weights_sha256"]
        for name, value in sorted(base.items()):
            digest.update(f"base/{name}={value}\n".encode())
    return digest.hexdigest()


def resolve_base(adapter_dir: str | os.PathLike[str], stored: str | os.PathLike[str]) -> Path:
    """The base export a stored path means: absolute as is, relative from the adapter dir
    (joined lexically, so it also works before the adapter dir exists)."""
    path = Path(stored)
    return path if path.is_absolute() else Path(os.path.normpath(Path(adapter_dir) / path))


def _check_full_export(base: Path, where: str, stored: str | None = None) -> None:
    note = f" (recorded as {stored!r}; relative paths start at the adapter dir)" if stored else ""
    from setokim.model.sharded import INDEX_FILE

    weights = (base / WEIGHTS_FILE).is_file() or (base / INDEX_FILE).is_file()
    if not (base / CONFIG_FILE).is_file() or not weights:
        raise FileNotFoundError(
            f"{where}: base export {str(base)!r}{note} is missing or is not a full SeTokIM "
            f"export (needs {CONFIG_FILE} and {WEIGHTS_FILE} or a sharded export's "
            f"{INDEX_FILE}); pass base=<its new dir> if it moved"
        )
    if is_adapter_export(base):
        raise ValueError(f"{where}: base export {str(base)!r}{note} is itself an adapter export")
    raw = json.loads((base / CONFIG_FILE).read_text(encoding="utf-8"))
    if raw.get("lora", {}).get("enabled", False):
        raise ValueError(
            f"{where}: base export {str(base)!r}{note} holds LoRA weights; use a Stage II "
            "export or a merged (full=True) export as the base"
        )


# ---- writing -------------------------------------------------------------------------------
def _config_json(model: SeTokIM, config: Any) -> str:
    cfg = asdict(config)
    cfg["llm_config"] = model.llm.config.to_dict()
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def _trainable_cpu(model: SeTokIM) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.trainable_state_dict().items()}


def _write_common(model: SeTokIM, tmp: Path, config: Any) -> None:
    (tmp / CONFIG_FILE).write_text(_config_json(model, config), encoding="utf-8")
    model.text_tokenizer.save_pretrained(str(tmp / TEXT_TOKENIZER_DIR))


def _check_base_weights(model: SeTokIM, base: Path, heads: list[str]) -> None:
    """Every weight the adapter export leaves out must equal the base's, else it would be lost.
    The base is one `model.safetensors` or a sharded export (each shard opened once)."""
    from safetensors import safe_open

    from setokim.model.sharded import export_weight_files

    skip = tuple(f"{h}." for h in heads)
    ours = {
        k.replace(".base_layer.", "."): v
        for k, v in model.trainable_state_dict().items()
        if "lora_" not in k and not k.startswith(skip)
    }
    where = {k: f for k, f in export_weight_files(base).items() if not k.startswith(skip)}
    if set(where) != set(ours):
        extra, lacking = sorted(set(where) - set(ours)), sorted(set(ours) - set(where))
        raise ValueError(
            f"base export {str(base)!r} does not fit the model: keys only in the base "
            f"{extra[:5]}, only in the model {lacking[:5]}"
        )
    changed: list[str] = []
    for file in sorted(set(where.values())):
        with safe_open(str(base / file), framework="pt") as f:
            changed += [
                k
                for k, v in ours.items()
                if where[k] == file
                and not torch.equal(v.detach().cpu(), f.get_tensor(k).to(v.dtype))
            ]
    if changed:
        raise ValueError(
            f"weights outside the LoRA adapters and lora.train_heads differ from base export "
            f"{str(base)!r}: {sorted(changed)[:5]}; an adapter export would lose them: save with "
            "full=True or name those modules in lora.train_heads"
        )


def save_full(model: SeTokIM, directory: str | os.PathLike[str], *, merge: bool) -> Path:
    """Self-contained export; `merge` folds LoRA into the LLM weights and disables it."""
    from safetensors.torch import save_file

    from setokim.model.lora import merged_weights

    state = _trainable_cpu(model)
    config = model.config
    if merge and config.lora.enabled:
        state = {k: v.contiguous() for k, v in merged_weights(state, model).items()}
        config = replace(config, lora=replace(config.lora, enabled=False))

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS_FILE))
        write_full_parts(model, tmp, config)

    return write_dir_atomically(directory, fill)


def write_full_parts(model: SeTokIM, directory: Path, config: Any) -> None:
    """A full export's files besides its weights (config, text tokenizer, SeTok): shared by
    `save_full` and a sharded export, whose weights every rank writes
    (`sharded.export_checkpoint_weights`)."""
    _write_common(model, directory, config)
    if hasattr(model.vision_tokenizer, "save_pretrained"):
        model.vision_tokenizer.save_pretrained(str(directory / SETOK_DIR))


def save_adapter(
    model: SeTokIM, directory: str | os.PathLike[str], base: str | os.PathLike[str]
) -> Path:
    """Adapter export over the full export `base` (stored as given; checked before writing)."""
    from safetensors.torch import save_file

    from setokim.model.lora import adapter_weights, head_weights

    if not model.config.lora.enabled:
        raise ValueError("an adapter export needs a model with lora.enabled (Stage III)")
    target = Path(directory)
    stored = os.fspath(base)
    base_dir = resolve_base(target, stored)
    _check_full_export(base_dir, f"save_pretrained({str(target)!r})", stored)
    heads = list(model.config.lora.train_heads)
    _check_base_weights(model, base_dir, heads)
    adapters = adapter_weights(model)
    head_state = head_weights(model, heads)
    info = {"format": ADAPTER_FORMAT, "base": stored, "weights_sha256": weights_sha256(base_dir)}

    def fill(tmp: Path) -> None:
        save_file(adapters, str(tmp / ADAPTER_FILE))
        save_file(head_state, str(tmp / HEADS_FILE))
        _write_common(model, tmp, model.config)
        (tmp / BASE_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    return write_dir_atomically(target, fill)


# ---- reading -------------------------------------------------------------------------------
def read_config(directory: Path) -> tuple[SeTokIMConfig, dict[str, Any]]:
    """An export's SeTokIMConfig and its LLM's transformers config (no weights read)."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(directory)!r} is not a SeTokIM export (no {CONFIG_FILE})")
    raw = json.loads(path.read_text(encoding="utf-8"))
    llm_config = raw.pop("llm_config")
    return from_dict(SeTokIMConfig, raw), llm_config


def check_device(device: torch.device | str) -> torch.device:
    """`device` as a torch.device; a CUDA device on a machine without CUDA is an error naming
    it (a load never falls back to the CPU)."""
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("device: 'meta' holds no values; load onto 'cpu' or 'cuda:N'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine")
    return device


def _build(
    cls: type[SeTokIM],
    cfg: Any,
    llm_config: dict[str, Any],
    tokenizer_dir: Path,
    setok_dir: Path,
    parts: dict[str, Any],
) -> SeTokIM:
    """The model from a saved config, its LLM built from its HF config on the meta device
    (nothing downloads, no random LLM is allocated: `assign_export_weights` gives it the
    export's tensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from setokim.model.local import load_text_tokenizer
    from setokim.model.setokim import _DTYPES

    parts = dict(parts)
    text_tokenizer = parts.pop("text_tokenizer", None) or load_text_tokenizer(
        tokenizer_dir, "export text tokenizer"
    )
    vision = parts.pop("vision_tokenizer", None)
    if vision is None and setok_dir.is_dir():
        from setok_tokenizer import SeTok

        vision = SeTok.from_pretrained(str(setok_dir))
    llm_config = dict(llm_config)
    model_type = llm_config.pop("model_type")
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **llm_config))
        llm = llm.to(_DTYPES[cfg.llm.dtype])
    return cls.from_config(
        cfg, llm=llm, vision_tokenizer=vision, text_tokenizer=text_tokenizer, **parts
    )


def assign_export_weights(
    model: SeTokIM,
    directory: Path,
    device: torch.device | str,
    *,
    defer: str | None = None,
) -> None:
    """Give `model` (its LLM on the meta device, `_build`) a full export's tensors (one
    `model.safetensors` or a sharded export), read straight onto `device` and assigned, not
    copied into random weights: on a GPU host memory holds about one tensor at a time, on the
    CPU the weights are the file's private mapping (one copy). The rest of the model (SeTok,
    decoders) is moved to `device`.

    Names starting with `defer` stay on the meta device (shapes checked from the file's
    header) for `sharded.materialise_from_export` to fill once FSDP2 has sharded them.
    A name the model lacks or the export lacks, or a shape that does not fit, is an error
    naming it; so is a tensor left on the meta device."""
    from safetensors import safe_open

    from setokim.model.sharded import export_weight_files, materialise_buffers

    device = check_device(device)
    files = export_weight_files(directory)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(FROZEN_PREFIXES)}
    missing = sorted(set(own) - set(files))
    unexpected = sorted(set(files) - set(own))
    if missing or unexpected:
        raise RuntimeError(
            f"export {str(directory)!r} does not fit the model: missing={missing[:5]} "
            f"unexpected={unexpected[:5]}"
        )
    by_file: dict[str, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    state: dict[str, Tensor] = {}
    for file, names in sorted(by_file.items()):
        with safe_open(str(directory / file), framework="pt", device=str(device)) as handle:
            for name in names:
                deferred = defer is not None and name.startswith(defer)
                # a deferred tensor's shape from the file's header: it is read later, by rows
                value = handle.get_slice(name) if deferred else handle.get_tensor(name)
                shape = tuple(value.get_shape() if deferred else value.shape)
                if shape != tuple(own[name].shape):
                    raise ValueError(
                        f"{directory / file}: {name} has shape {shape}, the model "
                        f"{tuple(own[name].shape)}"
                    )
                if not deferred:
                    state[name] = value.to(own[name].dtype)
    model.load_state_dict(state, strict=False, assign=True)
    del state
    materialise_buffers(model.llm, device)
    model._apply(lambda t: t if t.is_meta else t.to(device))  # SeTok, decoders: not exported
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if defer is not None:
        left = [n for n in left if not n.startswith(defer)]
    if left:
        raise RuntimeError(f"{directory}: still on the meta device after loading: {left[:5]}")


def load_full(
    cls: type[SeTokIM],
    directory: Path,
    parts: dict[str, Any],
    device: torch.device | str,
    *,
    defer: str | None = None,
) -> SeTokIM:
    """Inverse of `save_full`, onto `device` (`assign_export_weights`, which says what `defer`
    does); remembers `directory` as the base for a later adapter export."""
    cfg, llm_config = read_config(directory)
    model = _build(
        cls, cfg, llm_config, directory / TEXT_TOKENIZER_DIR, directory / SETOK_DIR, parts
    )
    assign_export_weights(model, directory, device, defer=defer)
    if not cfg.lora.enabled:
        model.base_export = directory.resolve()
    return model


def load_adapter(
    cls: type[SeTokIM],
    directory: Path,
    parts: dict[str, Any],
    device: torch.device | str,
    base: str | os.PathLike[str] | None = None,
) -> SeTokIM:
    """Inverse of `save_adapter`: base export (hash-checked, `assign_export_weights` onto
    `device`) + LoRA + adapter and head weights."""
    from safetensors.torch import load_file

    from setokim.model.lora import apply_lora, head_weights, load_adapter_weights

    where = f"adapter export {str(directory)!r}"
    info = json.loads((directory / BASE_FILE).read_text(encoding="utf-8"))
    if info.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{where}: unknown format {info.get('format')!r} in {BASE_FILE}")
    stored = info["base"]
    base_dir = Path(base) if base is not None else resolve_base(directory, stored)
    _check_full_export(base_dir, where, stored)
    found = weights_sha256(base_dir)
    if found != info["weights_sha256"]:
        raise ValueError(
            f"{where}: the weights of base export {str(base_dir)!r} (recorded as {stored!r}) are "
            f"not the ones it was trained on: sha256 {found} != recorded "
            f"{info['weights_sha256']}"
        )
    cfg, llm_config = read_config(directory)
    plain = replace(cfg, lora=replace(cfg.lora, enabled=False))
    model = _build(
        cls, plain, llm_config, directory / TEXT_TOKENIZER_DIR, base_dir / SETOK_DIR, parts
    )
    assign_export_weights(model, base_dir, device)
    apply_lora(model, cfg.lora)  # peft makes the adapters on their base weights' device
    model.config = cfg
    on = str(check_device(device))
    load_adapter_weights(model, load_file(str(directory / ADAPTER_FILE), device=on), where)
    heads = load_file(str(directory / HEADS_FILE), device=on)
    expected = set(head_weights(model, list(cfg.lora.train_heads)))
    if set(heads) != expected:
        raise RuntimeError(
            f"{where}: {HEADS_FILE} does not fit lora.train_heads={cfg.lora.train_heads}: "
            f"missing={sorted(expected - set(heads))[:5]} extra={sorted(set(heads) - expected)[:5]}"
        )
    model.load_state_dict(heads, strict=False)
    model.base_export = base_dir.resolve()
    return model


# ---- CLI -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`merge ADAPTER_DIR OUT_DIR [--base DIR]`: write a self-contained merged export."""
    parser = argparse.ArgumentParser(
        prog="python -m setokim.model.export",
        description="SeTokIM exports: merge a LoRA adapter export into a self-contained one.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="adapter export (+ its base) -> merged full export")
    merge.add_argument("adapter_dir", type=Path, help="a Stage III adapter export")
    merge.add_argument("out_dir", type=Path, help="where the merged full export goes")
    merge.add_argument("--base", type=Path, default=None, help="the base export, if it moved")
    args = parser.parse_args(argv)
    from setokim.model.setokim import SeTokIM

    model = SeTokIM.from_pretrained(args.adapter_dir, base=args.base)
    out = model.save_pretrained(args.out_dir, full=True)
    print(f"merged export written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "ADAPTER_FILE",
    "BASE_FILE",
    "CONFIG_FILE",
    "HEADS_FILE",
    "WEIGHTS_FILE",
    "assign_export_weights",
    "check_device",
    "export_digest",
    "is_adapter_export",
    "load_adapter",
    "load_full",
    "resolve_base",
    "save_adapter",
    "save_full",
    "weights_sha256",
    "write_full_parts",
]
