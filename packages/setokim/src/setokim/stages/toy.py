"""A tiny seeded regression objective: exercises the loop in tests and the benchmark.

Data is an infinite, indexed stream of synthetic samples (fixed-size chunks, each from a
generator seeded with (data_seed, chunk)). Micro-batches are contiguous slices of it laid out
rank-major, so 2 ranks with micro-batch m see exactly the samples of 1 rank with micro-batch
2m, grad_accum=2 with m sees those of grad_accum=1 with 2m, and resuming is O(1).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from setok_tokenizer.config import from_dict

_CHUNK = 256  # samples per generator seed


@dataclass
class ToyConfig:
    """Sizes of the MLP and the data; the last three knobs exist for tests."""

    in_dim: int = 16
    hidden: int = 64
    depth: int = 3
    out_dim: int = 4
    dropout: float = 0.0
    noise: float = 0.01
    data_seed: int = 1234
    delay_s: float = 0.0  # sleep per micro-batch (to kill a subprocess mid-run)
    nan_at: list[int] = field(default_factory=list)  # micro-step indices whose loss is NaN
    seq_len: int = 1  # > 1 makes activations bigger (activation-checkpointing benchmark)


class ResidualBlock(nn.Module):
    """Pre-norm MLP block: x + W2(dropout(gelu(W1(ln(x)))))."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(self.drop(F.gelu(self.up(self.norm(x)))))


class ToyModel(nn.Module):
    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.embed = nn.Linear(cfg.in_dim, cfg.hidden)
        self.blocks = nn.ModuleList(
            ResidualBlock(cfg.hidden, cfg.dropout) for _ in range(cfg.depth)
        )
        self.head = nn.Linear(cfg.hidden, cfg.out_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class ToyStage:
    """Regression of y = tanh(x A) + noise with a residual MLP."""

    def __init__(self, cfg: ToyConfig) -> None:
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.data_seed)
        self._target = torch.randn(cfg.in_dim, cfg.out_dim, generator=g) / cfg.in_dim**0.5
        self._nan_at = set(cfg.nan_at)
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}

    def build_model(self) -> nn.Module:
        return ToyModel(self.cfg)

    def fsdp_units(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)  # type: ignore[union-attr]

    def samples(self, start: int, count: int) -> dict[str, Tensor]:
        """Samples [start, start+count) of the infinite stream, built from fixed-size chunks."""
        parts = []
        first, last = start // _CHUNK, (start + count - 1) // _CHUNK
        for chunk in range(first, last + 1):
            x, y = self._chunk(chunk)
            lo = max(start, chunk * _CHUNK) - chunk * _CHUNK
            hi = min(start + count, (chunk + 1) * _CHUNK) - chunk * _CHUNK
            parts.append((x[lo:hi], y[lo:hi]))
        return {"x": torch.cat([p[0] for p in parts]), "y": torch.cat([p[1] for p in parts])}

    def _chunk(self, chunk: int) -> tuple[Tensor, Tensor]:
        cached = self._cache.get(chunk)
        if cached is None:
            g = torch.Generator().manual_seed(self.cfg.data_seed * 1_000_003 + chunk)
            lead = (_CHUNK, self.cfg.seq_len) if self.cfg.seq_len > 1 else (_CHUNK,)
            x = torch.randn(*lead, self.cfg.in_dim, generator=g)
            y = torch.tanh(x @ self._target)
            y = y + self.cfg.noise * torch.randn(*lead, self.cfg.out_dim, generator=g)
            cached = (x, y)
            self._cache = {chunk: cached}  # streams move forward: keep only the newest
        return cached

    def batches(
        self, rank: int, world_size: int, start_step: int, micro_batch_size: int
    ) -> Iterator[dict[str, Tensor]]:
        """Micro-step j of rank r holds samples (j*world + r)*mb ... +mb of the stream."""
        step = start_step
        while True:
            batch = self.samples((step * world_size + rank) * micro_batch_size, micro_batch_size)
            batch["step"] = torch.tensor(step)
            yield batch
            step += 1

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        if self.cfg.delay_s:
            time.sleep(self.cfg.delay_s)
        pred = model(batch["x"])
        loss = F.mse_loss(pred.float(), batch["y"])
        if int(batch["step"]) in self._nan_at:
            loss = loss * float("nan")
        return loss, {}

    def describe(self) -> dict[str, Any]:
        return {"name": "toy", **asdict(self.cfg)}


def build(cfg: Mapping[str, Any]) -> ToyStage:
    """Registry entry: unknown keys are an error naming them."""
    return ToyStage(from_dict(ToyConfig, cfg, where="toy"))
