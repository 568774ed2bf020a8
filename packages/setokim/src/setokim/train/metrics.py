"""Run logging on rank 0: an append-only metrics JSONL (flushed per record) and wandb."""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path
from typing import Any

from setokim.train.config import WandbConfig
from setokim.utils.io import atomic_write_text

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; keep the record parseable and the fact visible.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Writes one JSON object per line to `<run_dir>/metrics.jsonl`; mirrors to wandb if on.

    Inactive (every call a no-op) on ranks other than 0.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        active: bool,
        wandb_cfg: WandbConfig | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.active = active
        self.path = Path(run_dir) / METRICS_FILE
        self._file = None
        self._wandb_run = None
        if not active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            self._wandb_run = _start_wandb(Path(run_dir), wandb_cfg, config or {})

    def log(self, record: dict[str, Any]) -> None:
        if not self.active or self._file is None:
            return
        record = {"time": time.time(), **record}
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            step = record.get("step")
            values = {k: v for k, v in record.items() if isinstance(v, int | float)}
            self._wandb_run.log(values, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def _start_wandb(run_dir: Path, cfg: WandbConfig, config: dict[str, Any]) -> Any:
    """wandb.init with a run id kept in the run dir, so a requeued job continues the run."""
    import wandb  # heavy import; only when asked for

    id_file = run_dir / "wandb_id.txt"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        atomic_write_text(id_file, run_id + "\n")
    return wandb.init(
        dir=str(run_dir),
        mode=cfg.mode,
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.name,
        tags=list(cfg.tags),
        config=config,
        id=run_id,
        resume="allow",
    )
