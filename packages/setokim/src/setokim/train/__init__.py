"""setokim.train: one training loop (FSDP2, DCP checkpoints, preemption) for every stage."""

from setokim.train.checkpoint import latest_checkpoint, list_checkpoints, load_model_state
from setokim.train.config import TrainerConfig, WandbConfig, resolve_schedule
from setokim.train.loop import NonFiniteLossError, train
from setokim.train.result import TrainResult
from setokim.train.stage import Stage

__all__ = [
    "NonFiniteLossError",
    "Stage",
    "TrainResult",
    "TrainerConfig",
    "WandbConfig",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model_state",
    "resolve_schedule",
    "train",
]
