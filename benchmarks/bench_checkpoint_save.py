"""Checkpoint save time vs size, and whether a paper-scale save fits the SLURM signal lead.

Measures `setokim.train.checkpoint.save_checkpoint` (DCP write of model + AdamW state, RNG
file, trainer state, the SHA-256 manifest pass over every file, rename) on one process for
models of growing size, fits seconds = fixed + bytes / throughput, and applies the fit to
each rank's share of a paper recipe's checkpoint: the trained parameters in fp32 (master
weights) plus AdamW's two fp32 moments, 12 bytes per trained parameter, sharded over the
ranks (FSDP2 + DCP: every rank writes and hashes its own share in parallel). The frozen SeTok
is not saved (frozen_sources.json). The bound is compared with `signal_delay_s` of the
cluster profiles: the trainer checks the signal after each optimizer step, so the lead time
must cover one step plus the save.

Run it where the checkpoints will live (`--dir` on the cluster's file system): the
throughput is that file system's, the fit is only as good as the disk it ran on.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from setokim.train.checkpoint import TrainerState, init_optimizer_state, save_checkpoint

PROFILES = Path(__file__).resolve().parent.parent / "slurm" / "profiles" / "cluster"
# Trained parameters of the Stage II recipes (full LLM + projector + regression head), from
# `launch.py plan` (experiments/README.md shows the 7B plan: 6.786 B trained).
RECIPES = {"setokim_vicuna7b_stage2": 6.786e9, "setokim_vicuna13b_stage2": 13.0e9}
BYTES_PER_TRAINED_PARAM = 4 + 4 + 4  # fp32 master weight, AdamW exp_avg, exp_avg_sq


def model_of(params: int, width: int = 1024) -> nn.Module:
    """Linear layers of `width` with about `params` parameters (fp32)."""
    layers = max(1, round(params / (width * width + width)))
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))


def time_save(params: int, root: Path, repeats: int) -> tuple[float, int]:
    """(best seconds of `save_checkpoint`, bytes on disk of one checkpoint)."""
    model = model_of(params)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    init_optimizer_state(optimizer)
    best = float("inf")
    size = 0
    for i in range(repeats):
        run = root / f"p{params}_{i}"
        state = TrainerState(step=i + 1, data_position=0, skipped_steps=0, nonfinite_in_row=0,
                             world_size=1, scheduler={})  # fmt: skip
        start = time.perf_counter()
        step_dir = save_checkpoint(run, model, optimizer, state, keep_last=2)
        best = min(best, time.perf_counter() - start)
        size = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
        shutil.rmtree(run)
    return best, size


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares seconds = fixed + bytes / throughput; returns (fixed s, bytes per s)."""
    n = len(points)
    mx = sum(b for b, _ in points) / n
    my = sum(t for _, t in points) / n
    sxx = sum((b - mx) ** 2 for b, _ in points)
    slope = sum((b - mx) * (t - my) for b, t in points) / sxx
    return max(my - slope * mx, 0.0), 1.0 / slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, nargs="+", default=[25e6, 50e6, 100e6, 200e6])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=16, help="GPUs of the recipe (2 x 8)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    root = Path(tempfile.mkdtemp(prefix="ckpt_bench_", dir=args.dir))
    points = []
    try:
        print(f"{'params':>10} {'bytes':>10} {'save s':>8} {'MB/s':>8}")
        for p in args.params:
            seconds, size = time_save(int(p), root, args.repeats)
            points.append((size, seconds))
            print(f"{p / 1e6:>9.0f}M {size / 1e6:>9.0f}M {seconds:>8.2f} {size / seconds / 1e6:>8.0f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    fixed, rate = fit(points)
    print(f"fit: {fixed:.2f} s + bytes / {rate / 1e6:.0f} MB/s")

    leads = {
        p.stem: yaml.safe_load(p.read_text()).get("signal_delay_s") for p in PROFILES.glob("*.yaml")
    }
    out = {"fixed_s": fixed, "bytes_per_s": rate, "points": points, "recipes": {}}
    for name, trained in RECIPES.items():
        per_rank = trained * BYTES_PER_TRAINED_PARAM / args.ranks
        seconds = fixed + per_rank / rate
        out["recipes"][name] = {"bytes_per_rank": per_rank, "save_s": seconds}
        fits = ", ".join(f"{k} {v} s: {'fits' if seconds < v else 'DOES NOT FIT'}"
                         for k, v in sorted(leads.items()) if v)  # fmt: skip
        print(f"{name}: {per_rank / 1e9:.1f} GB per rank on {args.ranks} ranks -> "
              f"{seconds:.0f} s to save ({fits})")  # fmt: skip
    out["signal_delay_s"] = leads
    print(json.dumps(out))


if __name__ == "__main__":
    main()
