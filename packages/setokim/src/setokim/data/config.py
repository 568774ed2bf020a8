"""Data configuration shared by the loader, the stages and the Hydra schemas."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    """Where the shards are and how one task view is read from them.

    `mix_weights` is only used with task="mix" (task name -> weight; each sample draws among
    the weighted tasks it has). The resume position is not part of the config: the loader
    takes `start_sample` (one task: samples this rank already consumed in `epoch`) or
    `start_batch` (batches already consumed; the only form a mix accepts).
    """

    shard_dir: str = "data/shapes_world"
    split: str = "train"
    task: str = "caption"
    batch_size: int = 8
    num_workers: int = 0
    seed: int = 0
    epoch: int = 0
    image_size: int | None = None
    on_error: str = "raise"
    shuffle: bool = True
    shuffle_buffer: int = 256
    expand: bool = False
    even: bool = True
    mix_weights: dict[str, float] = field(default_factory=dict)
