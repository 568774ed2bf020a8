"""Counting the bytes a piece of code allocates for tensors, tensor by tensor.

Why not resident memory: a peak measured that way depends on the allocator and the machine
(the same load measured 1.3 copies of the weights on one box, 2 on another). A dispatch mode
sees every tensor an op creates, so the figure is the same everywhere.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class AllocatedBytes(TorchDispatchMode):
    """Use as `with AllocatedBytes() as counter: ...`; then read

    `total`: bytes of every new (not a view, not in place) non-meta tensor an op returns; a
      DTensor counts its local shard (the mode sees the DTensor op, not its local ops).
    `attached`: bytes of the storages given to tensors by `set_` from outside torch's ops, each
      storage once: how safetensors hands out what it reads from a file (`safe_open`,
      `load_file`), which `total` does not see.
    `total + attached` is what the code allocated for tensors, reads of files included.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.attached = 0
        self._storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        from torch.distributed.tensor import DTensor

        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.set_:
            storage = args[1] if len(args) > 1 else None
            if isinstance(storage, torch.UntypedStorage) and storage.device.type != "meta":
                if storage.data_ptr() not in self._storages:
                    self._storages.add(storage.data_ptr())
                    self.attached += storage.nbytes()
        elif not func.is_view and not func._schema.is_mutable:
            for t in tree_flatten(out)[0]:
                if isinstance(t, DTensor):
                    t = t.to_local()
                if isinstance(t, torch.Tensor) and not t.is_meta:
                    self.total += t.numel() * t.element_size()
        return out

    @property
    def all(self) -> int:
        """`total + attached`: every byte allocated for tensors, file reads included."""
        return self.total + self.attached


def allocated_bytes(run: Any) -> tuple[Any, AllocatedBytes]:
    """(`run()`'s result, the counter that watched it)."""
    with AllocatedBytes() as counter:
        out = run()
    return out, counter


__all__ = ["AllocatedBytes", "allocated_bytes"]
