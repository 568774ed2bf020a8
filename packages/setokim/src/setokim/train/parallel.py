"""How the model is spread over ranks: FSDP2, plain replication, activation checkpointing."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(units: list[nn.Module]) -> None:
    """Recompute each unit's forward in backward instead of storing its activations.

    The unit's own forward is replaced on the instance, so module names, state-dict keys and
    FSDP hooks (which run in __call__) are untouched.
    """
    for unit in units:
        if getattr(unit, "_setok_ac", False):
            continue
        inner = unit.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        unit.forward = forward  # type: ignore[method-assign]
        unit._setok_ac = True  # type: ignore[attr-defined]


def apply_fsdp(
    model: nn.Module,
    units: list[nn.Module],
    *,
    device_type: str,
    world_size: int,
    param_dtype: torch.dtype | None,
) -> nn.Module:
    """FSDP2: `fully_shard` every unit, then the root (which picks up the leftovers).

    With a low `param_dtype` (bf16 compute) the trainable parameters are kept as fp32
    master weights first (`fp32_master_weights`): FSDP2 all-gathers them in bf16 for
    compute, while gradients, AdamW states and updates stay fp32, so a late update far
    below bf16's resolution (~3 significant digits) is not rounded away.
    """
    if param_dtype is not None:
        fp32_master_weights(model)
    mesh = init_device_mesh(device_type, (world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of `model`'s parameters and buffers on the meta device (not materialised)."""
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]


def fp32_master_weights(model: nn.Module) -> int:
    """Cast every trainable floating-point parameter to fp32 in place; returns how many.

    A model loaded in bf16 (an LLM's `dtype: bfloat16`) would otherwise train pure bf16:
    bf16 weights and bf16 AdamW states. Frozen parameters keep their dtype (memory).
    """
    count = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            count += 1
    return count


def broadcast_parameters(model: nn.Module) -> None:
    """Make every rank start from rank 0's weights (replicated, non-FSDP mode)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


def allreduce_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Average gradients over ranks in one flat buffer (replicated, non-FSDP mode)."""
    for p in params:  # every rank must contribute the same layout
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n
