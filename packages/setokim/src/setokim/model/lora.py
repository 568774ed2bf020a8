"""LoRA for Stage III (peft), injected in place so the module tree stays SeTokIM's own.

Adapters are plain `nn.Linear` sub-modules (`lora_A` / `lora_B`) inside the targeted LLM
projections; everything else is frozen unless named in `train_heads`. Under FSDP2 shard each
decoder layer as a unit: frozen base weights and trainable adapters then share a unit but
keep one dtype per parameter group (cast adapters to the base dtype with `adapter_dtype`).
"""

from __future__ import annotations

from torch import nn

from setokim.model.config import LoRAConfig


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Inject LoRA into `model.llm`; freeze all but adapters and `cfg.train_heads`."""
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
    inject_adapter_in_model(lora_cfg, model.llm)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    for head in cfg.train_heads:
        module = getattr(model, head, None)
        if not isinstance(module, nn.Module):
            raise ValueError(f"lora.train_heads names {head!r}, which is not a SeTokIM module")
        module.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module) -> dict:
    """Only the adapter weights (what a Stage III checkpoint must add to Stage II)."""
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


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
