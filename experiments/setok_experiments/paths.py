"""Where things are, relative to this file (never an absolute path of one machine)."""

from __future__ import annotations

from pathlib import Path

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = EXPERIMENTS_DIR.parent
CONF_DIR = EXPERIMENTS_DIR / "conf"
CLUSTER_PROFILES_DIR = REPO_ROOT / "slurm" / "profiles"
