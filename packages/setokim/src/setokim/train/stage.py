"""The contract between a training objective (a "stage") and the one training loop.

A stage owns the model, the data and the loss; the loop owns devices, sharding, precision,
optimisation, checkpoints, signals and logging. Stages live in `setokim.stages`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class DeferredModel:
    """A model whose large frozen weights are still on the meta device, and the function that
    fills them on a device once the loop has sharded the model with FSDP2.

    Why: built whole, a 7B/13B LLM costs one full copy per rank; filled after sharding,
    each rank reads and holds only its own rows (`setokim.model.sharded`).
    """

    model: nn.Module
    materialise: Callable[[torch.device], None]


@runtime_checkable
class Stage(Protocol):
    """What the loop needs from an objective.

    Optional extras, looked up with getattr: `trainable(model) -> list[nn.Parameter]`
    (defaults to every parameter with requires_grad), `describe() -> dict` (logged
    into the run's metadata) and `epoch_batches(rank, world_size, micro_batch_size) -> int`
    (full micro-batches each rank reads in one pass over the stage's data, the same on
    every rank; needed for `TrainerConfig.epochs`) and `frozen_sources() -> dict[str, path]`
    (the files `build_model` builds the frozen parameters from, possibly none: checkpoints
    then store only what trains plus each source's path and SHA-256, and resume refuses a
    source whose bytes changed) and `build_model_deferred() -> DeferredModel` (used
    instead of `build_model` when FSDP2 shards over more than one rank: the model, same
    as `build_model`'s once materialised, with its large frozen weights on the meta device).
    """

    def build_model(self) -> nn.Module:
        """A freshly initialised model on the CPU, deterministic given the stage config."""
        ...

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        """Sub-modules to shard one by one (and to activation-checkpoint); root goes last."""
        ...

    def batches(
        self, rank: int, world_size: int, start_step: int, micro_batch_size: int
    ) -> Iterator[Any]:
        """Deterministic micro-batches for `rank`, skipping the first `start_step` of them.

        `start_step` counts micro-batches this rank already consumed (the loop's data
        position), so a resumed run sees exactly the batches an uninterrupted run would.
        The loop moves tensors (also inside dicts/lists/tuples) to the device.
        """
        ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss (mean over the micro-batch) and extra float metrics to log."""
        ...
