"""Feature grids with planted groups: a stand-in for a frozen encoder's features on a scene.

Used by the tests and by benchmarks/bench_token_count.py to check that the number of
clusters follows the content. Group 0 is a large background; groups 1..m-1 hold 6..60 tokens
each; members of a group have pairwise cosine about `tightness`, and groups about `between`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PlantedScene:
    """features (N, D) L2-normalised; labels (N,) long group of each token, 0..groups-1."""

    features: Tensor
    labels: Tensor
    groups: int


def planted_scene(
    groups: int,
    *,
    tokens: int = 576,
    dim: int = 64,
    tightness: tuple[float, float] = (0.75, 0.9),
    between: tuple[float, float] = (0.2, 0.3),
    group_size: tuple[int, int] = (6, 60),
    background_share: float = 0.4,
    generator: torch.Generator | None = None,
) -> PlantedScene:
    """One scene of `groups` groups (background included), drawn from `generator`.

    Each group's tightness is drawn from `tightness`; the scene's between-group cosine from
    `between`. Group sizes are drawn from `group_size` and shrunk (not below its minimum) so
    the background keeps at least `background_share` of the tokens.
    """
    if groups < 1 or groups > dim - 1:
        raise ValueError(f"groups must be in [1, {dim - 1}] for dim={dim}, got {groups}")
    low, high = group_size
    g = generator
    sizes = [int(torch.randint(low, high + 1, (1,), generator=g)) for _ in range(groups - 1)]
    room = int(tokens * (1.0 - background_share))
    if sum(sizes) > room:
        sizes = [max(low, s * room // sum(sizes)) for s in sizes]
    if sum(sizes) >= tokens:
        raise ValueError(f"{groups} groups of >= {low} tokens do not fit in {tokens} tokens")
    sizes = [tokens - sum(sizes), *sizes]
    tight = torch.empty(groups).uniform_(*tightness, generator=g)
    cos_between = float(torch.empty(()).uniform_(*between, generator=g))
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    # group directions share a common axis: their pairwise cosine is `shared`, and members
    # (sqrt(t) direction + sqrt(1 - t) noise) then meet other groups' members at ~t * shared
    shared = min(0.95, cos_between / float(tight.mean()))
    directions = (
        math.sqrt(shared) * basis[:, :1].T + math.sqrt(1.0 - shared) * basis[:, 1 : 1 + groups].T
    )
    labels = torch.cat([torch.full((s,), k) for k, s in enumerate(sizes)])
    labels = labels[torch.randperm(tokens, generator=g)]
    noise = F.normalize(torch.randn(tokens, dim, generator=g), dim=-1)
    t = tight[labels][:, None]
    x = t.sqrt() * directions[labels] + (1.0 - t).sqrt() * noise
    return PlantedScene(F.normalize(x, dim=-1), labels, groups)


def swallowed_groups(labels: Tensor, owner: Tensor, share: float = 0.9) -> int:
    """The most whole groups (>= share of a group's tokens) that one cluster holds."""
    most = 0
    for cluster in owner.unique().tolist():
        inside = owner == cluster
        whole = sum(
            int((inside & (labels == grp)).sum() >= share * (labels == grp).sum())
            for grp in labels.unique().tolist()
        )
        most = max(most, whole)
    return most
