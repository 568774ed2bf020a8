"""LoRA for Stage III (peft), injected in place so the module tree stays SeTokIM's own.

Adapters are plain `nn.Linear` sub-modules (`lora_A` / `lora_B`) inside the targeted LLM
projections; everything else is frozen unless named in `train_heads`. Under FSDP2 shard each
decoder layer as a unit: frozen base weights and trainable adapters then share a unit but
keep one dtype per parameter group (cast adapters to the base dtype with `adapter_dtype`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from setokim.model.config import LoRAConfig


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Inject LoRA into `model.llm`; freeze all but adapters and `cfg.train_heads`. Base
    weights on the meta device get real adapters, the same as over loaded weights."""
    from peft import LoraConfig, inject_adapter_in_model

    if cfg.rank < 1:
        raise ValueError(f"lora.rank must be >= 1, got {cfg.rank}")
    if not cfg.target_modules:
        raise ValueError("lora.target_modules is empty")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.llm.named_modules()}
    unknown = [t for t in cfg.target_modules if t not in names]
    if unknown:
        raise ValueError(f"lora.target_modules {unknown} match no module of the LLM")
    lora_cfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )
    with _cpu_stand_ins(model.llm):
        inject_adapter_in_model(lora_cfg, model.llm)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    for head in cfg.train_heads:
        module = getattr(model, head, None)
        if not isinstance(module, nn.Module):
            raise ValueError(f"lora.train_heads names {head!r}, which is not a SeTokIM module")
        module.requires_grad_(True)
    return model


@contextmanager
def _cpu_stand_ins(module: nn.Module) -> Iterator[None]:
    """Swap `module`'s meta parameters for zero-memory CPU stand-ins (one element, expanded)
    while peft injects, then put them back.

    Why: peft creates each adapter on its base weight's device; on the meta device (Stage
    III's LLM before sharding, `load_export_on_meta(defer_llm=True)`) the adapters would have
    no values. With stand-ins they are initialised on the CPU exactly as over real weights.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    for owner in module.modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if param.is_meta:
                stand_in = torch.zeros((), dtype=param.dtype).expand(param.shape)
                owner._parameters[name] = nn.Parameter(stand_in, param.requires_grad)
                swapped.append((owner, name, param))
    try:
        yield
    finally:
        for owner, name, param in swapped:
            owner._parameters[name] = param


def lora_state_dict(model: nn.Module) -> dict:
    """Only the adapter weights (what a Stage III checkpoint must add to Stage II)."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def adapter_weights(model: nn.Module) -> dict[str, Tensor]:
    """peft's adapter state dict of `model.llm` (peft key names, no embedding layers)."""
    from peft import get_peft_model_state_dict

    if not getattr(model.llm, "peft_config", None):
        raise ValueError("the model has no LoRA adapters (apply_lora was not called)")
    state = get_peft_model_state_dict(model.llm, save_embedding_layers=False)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def load_adapter_weights(model: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Inverse of `adapter_weights`; every injected adapter must be covered, nothing extra."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model.llm, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"{where}: adapter weights do not fit the LoRA config: missing={missing[:5]} "
            f"unexpected={list(result.unexpected_keys)[:5]}"
        )


def head_weights(model: nn.Module, heads: list[str]) -> dict[str, Tensor]:
    """Full weights of the SeTokIM modules named in `lora.train_heads`, keyed as in the model."""
    out: dict[str, Tensor] = {}
    for head in heads:
        module = getattr(model, head, None)
        if not isinstance(module, nn.Module):
            raise ValueError(f"lora.train_heads names {head!r}, which is not a SeTokIM module")
        for k, v in module.state_dict().items():
            out[f"{head}.{k}"] = v.detach().contiguous().cpu()
    return out


@torch.no_grad()
def merged_weights(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """`state` (a SeTokIM state dict with LoRA injected) with every adapter folded into its
    base weight and the keys of a model without LoRA: `x.base_layer.weight` -> `x.weight`."""
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            active = [a for a in module.active_adapters if a in module.lora_A]
            if active:
                deltas[name] = sum(module.get_delta_weight(a) for a in active)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if "lora_" in key:
            continue
        if ".base_layer." in key:
            owner, _, leaf = key.rpartition(".base_layer.")
            if leaf == "weight" and owner in deltas:
                value = (value + deltas[owner].to(value.device, value.dtype)).detach()
            key = f"{owner}.{leaf}"
        out[key] = value
    return out


def adapter_dtype(model: nn.Module) -> None:
    """Cast adapters to their base layer's dtype so FSDP2 units hold one dtype."""
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if base is None or not hasattr(module, "lora_A"):
            continue
        dtype = base.weight.dtype
        for sub in (module.lora_A, module.lora_B):
            sub.to(dtype)


def trainable_summary(model: nn.Module) -> str:
    """A one-line count of trainable vs total parameters (printed by stages)."""
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable {train:,} / {total:,} parameters ({100.0 * train / max(total, 1):.2f}%)"
