#!/usr/bin/env python
"""Launch an experiment: `python experiments/launch.py +exp=quickstart [overrides]`.

Composes experiments/conf with Hydra, validates it (bad keys/values exit 2 before anything
is queued), expands the experiment's sweep into one job array (inline, submitit local, or
SLURM) and prints job ids and run dirs. `launch.py status DIR` reports an earlier launch.
Run it with the workspace's python (`uv run python experiments/launch.py ...`): SLURM and
local jobs re-run this same interpreter.
"""

from __future__ import annotations

import sys
from pathlib import Path

# setok_experiments sits next to this file; jobs get the same path via PYTHONPATH.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from setok_experiments.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
