"""bf16 compute with fp32 master weights: a tiny late update survives (pure bf16 loses it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from setokim.train.parallel import apply_fsdp, fp32_master_weights


def test_fp32_master_weights_casts_only_trainable_parameters() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).to(torch.bfloat16)
    model[1].requires_grad_(False)
    assert fp32_master_weights(model) == 2
    assert model[0].weight.dtype == torch.float32 and model[1].weight.dtype == torch.bfloat16


def _late_update(master: bool) -> float:
    """One AdamW step at lr 1e-5 on weights of 1.0 (bf16 spacing at 1.0 is 2**-7)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 1, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    model = model.to(torch.bfloat16)
    fd, store = tempfile.mkstemp(prefix="setok_pg_")
    os.close(fd)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        if master:
            apply_fsdp(
                model, [model[0]], device_type="cpu", world_size=1, param_dtype=torch.bfloat16
            )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
        x = torch.randn(16, 8, dtype=torch.bfloat16)
        model(x).float().pow(2).mean().backward()
        opt.step()
        weight = model[0].weight
        full = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
        states = [s["exp_avg_sq"].dtype for s in opt.state.values()]
        assert all(d == (torch.float32 if master else torch.bfloat16) for d in states)
        return float((full.detach().float() - 1.0).abs().max())
    finally:
        dist.destroy_process_group()
        Path(store).unlink(missing_ok=True)


def test_a_tiny_late_update_survives_with_fp32_master_weights() -> None:
    assert _late_update(master=False) == 0.0  # 1e-5 is below bf16's step at 1.0: lost
    moved = _late_update(master=True)
    assert 0.5e-5 < moved < 2e-5  # Adam's first step moves each weight by ~lr
