#!/usr/bin/env python
"""Launch an experiment: `python experiments/launch.py +exp=quickstart [overrides]`.

Composes experiments/conf with Hydra, validates it (bad keys/values exit 2 before anything
is queued), expands the experiment's sweep into one job array (inline, submitit local, or
SLURM) and prints job ids and run dirs. `launch.py status DIR` reports an earlier launch.
Run it with the workspace's python (`uv run python experiments/launch.py ...`, or the
`setok-launch` console script of the `setok-experiments` package): SLURM and local jobs
re-run this same interpreter.
"""

from __future__ import annotations

import sys

from setok_experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
