"""Bytes allocated to load a SeTokIM export for evaluation: `SeTokIM.from_pretrained` (LLM on
the meta device, the export's tensors assigned) against the loader it replaced (a random LLM
from the saved config, then the files copied into it), for a full export and for a LoRA
adapter export over it, on the CPU.

Allocations are counted tensor by tensor (`setokim.utils.memory.AllocatedBytes`: tensors
torch's ops create plus storages safetensors attaches when it reads a file), so the figures
do not depend on the allocator or the machine. Both loaders must give the same state dict
and the same logits, else the script fails. Prints a table, then one JSON line.

    uv run --locked python benchmarks/bench_export_load.py [--hidden 512 --layers 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from setokim.model.build import build_tiny_setokim
from setokim.model.config import LLMConfig, LoRAConfig, SeTokIMConfig
from setokim.model.packing import Sample, Text
from setokim.model.setokim import SeTokIM
from setokim.utils.memory import allocated_bytes

LORA = LoRAConfig(enabled=True, rank=8, alpha=16, dropout=0.0, train_heads=["projector"])


def previous_load(directory: Path) -> SeTokIM:
    """The loader `SeTokIM.from_pretrained` used before it built the LLM on the meta device:
    a random LLM from the saved config, the export's files read and copied into it (for an
    adapter export: its base's, then LoRA, the adapter and the head weights)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from setok_tokenizer import SeTok
    from setokim.model import export
    from setokim.model.local import load_text_tokenizer
    from setokim.model.lora import apply_lora, load_adapter_weights
    from setokim.model.setokim import _DTYPES
    from setokim.model.sharded import export_weight_files

    cfg, llm_config = export.read_config(directory)
    base = directory
    if export.is_adapter_export(directory):
        info = json.loads((directory / export.BASE_FILE).read_text(encoding="utf-8"))
        base = export.resolve_base(directory, info["base"])
    hf = dict(llm_config)
    model_type = hf.pop("model_type")
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf))
    model = SeTokIM.from_config(
        replace(cfg, lora=replace(cfg.lora, enabled=False)),
        llm=llm.to(_DTYPES[cfg.llm.dtype]),
        text_tokenizer=load_text_tokenizer(directory / export.TEXT_TOKENIZER_DIR),
        vision_tokenizer=SeTok.from_pretrained(str(base / export.SETOK_DIR)),
    )
    state: dict[str, torch.Tensor] = {}
    for file in sorted(set(export_weight_files(base).values())):
        state.update(load_file(str(base / file)))
    model.load_state_dict(state, strict=False)
    if base != directory:
        apply_lora(model, cfg.lora)
        model.config = cfg
        adapters = load_file(str(directory / export.ADAPTER_FILE))
        load_adapter_weights(model, adapters, str(directory))
        model.load_state_dict(load_file(str(directory / export.HEADS_FILE)), strict=False)
    return model


def logits(model: SeTokIM) -> torch.Tensor:
    """The LM's logits on a short text sample (the same input for both loaders)."""
    with torch.no_grad():
        return model.eval()(model.collate([Sample([Text("a red circle", train=True)])])).logits


def write_exports(root: Path, llm: LLMConfig) -> tuple[Path, Path]:
    """A full export of a tiny SeTokIM with `llm`, and a LoRA adapter export over it whose
    adapters and projector moved away from their initial values."""
    full = build_tiny_setokim(replace(SeTokIMConfig(), llm=llm), with_decoders=False)
    full = full.save_pretrained(root / "full")
    from setokim.model.lora import apply_lora

    model = SeTokIM.from_pretrained(full)
    apply_lora(model, LORA)
    model.config = replace(model.config, lora=LORA)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("projector."):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return full, model.save_pretrained(root / "adapter")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512, help="the LLM's hidden size")
    parser.add_argument("--layers", type=int, default=4, help="the LLM's decoder layers")
    args = parser.parse_args(argv)
    llm = LLMConfig(hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                    num_kv_heads=8, intermediate_size=3 * args.hidden)  # fmt: skip
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        full, adapter = write_exports(Path(tmp), llm)
        weights = (full / "model.safetensors").stat().st_size
        for name, path in (("full", full), ("adapter", adapter)):
            old, old_count = allocated_bytes(lambda p=path: previous_load(p))
            new, new_count = allocated_bytes(lambda p=path: SeTokIM.from_pretrained(p))
            ours, want = new.state_dict(), old.state_dict()
            if set(ours) != set(want) or any(not torch.equal(ours[k], want[k]) for k in want):
                raise SystemExit(f"{name}: the two loaders give different state dicts")
            if not torch.equal(logits(new), logits(old)):
                raise SystemExit(f"{name}: the two loaders give different logits")
            rows[name] = {"previous": old_count.all, "meta": new_count.all,
                          "ratio": new_count.all / old_count.all}  # fmt: skip
            del old, new
    print(f"export weights (model.safetensors): {weights / 2**20:.1f} MiB")
    print(f"{'export':8} {'previous loader':>16} {'from_pretrained':>16} {'new/old':>8}")
    for name, row in rows.items():
        print(f"{name:8} {row['previous'] / weights:15.2f}x {row['meta'] / weights:15.2f}x "
              f"{row['ratio']:8.3f}")  # fmt: skip
    print(json.dumps({"weights_bytes": weights, **rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
