"""Data configuration shared by the loader, the stages and the Hydra schemas."""

from __future__ import annotations

from dataclasses import dataclass, field

from setokim.data.shapes_world import World


@dataclass
class DataConfig:
    """Where the shards are and how one task view is read from them.

    `mix_weights` is only used with task="mix" (task name -> weight; each sample draws among
    the weighted tasks it has). The resume position is not part of the config: the loader
    takes `start_sample` (one task: samples this rank already consumed in `epoch`) or
    `start_batch` (batches already consumed; the only form a mix accepts).

    expand: shards hold one sample per image with all its questions (annotations); without
    `expand` an epoch reads each image once and draws one of its items, so `trainer.epochs`
    counts images. With `expand` every item is its own training example, batches are always
    full (one task: planned like a one-task mix), and an epoch is every question once.
    generate: write a Shapes World into `shard_dir` when it holds no dataset (the Shapes World
    recipes set it); otherwise a missing `shard_dir` is an error, never silently generated.
    allow_missing_masks: Stage I sub-phase 2 (and the quickstart objective) train against
    object masks; data without any is refused at launch unless this is true.
    world: the Shapes World that `generate` writes (shape set, object scale, rotation,
    crowding); a generated dataset whose manifest records another world is refused.
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
    generate: bool = False
    allow_missing_masks: bool = False
    world: World = field(default_factory=World)

    def __post_init__(self) -> None:
        # Sizes are checked here, at launch, instead of failing later on a shard sample.
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"data.image_size: must be >= 1 or null, got {self.image_size}")
        for key, low in (("batch_size", 1), ("num_workers", 0), ("epoch", 0),
                         ("shuffle_buffer", 1)):  # fmt: skip
            if getattr(self, key) < low:
                raise ValueError(f"data.{key}: must be >= {low}, got {getattr(self, key)}")
