"""Measure Stage I on Shapes World (CPU): reconstruction and cluster/object mask agreement.

    uv run python benchmarks/measure_stage1.py [--out-dir runs/measure_stage1] [OVERRIDE ...]

OVERRIDEs are Hydra overrides of `+exp=stage1_shapes` (e.g. stage.params.kl_weight=0); they
apply to both sub-phases. `--phase1-from RUN` starts sub-phase 2 from an existing
sub-phase-1 run (ablations of sub-phase 2 from one starting point); `--no-recon` skips the
reconstruction column (it samples the diffusion decoder and is the slow part).

Trains with the `+exp=stage1_shapes` settings (composed by the launcher's config code), as
two runs so that each sub-phase has its own checkpoint: sub-phase 1 (encoder frozen;
merger, mapper, U-Net train) and sub-phase 2 (mask decoder + KL, initialised from
sub-phase 1). `--runs P1 P2` measures existing run dirs instead of training.

Measured on held-out images (the dataset's val + test splits, never trained on):
- reconstruction L1 (mean |x - decode(tokenize(x))| in [0, 1] at the decoder resolution)
  for an untrained model, after sub-phase 1 and after sub-phase 2; a flat grey image
  (0.5) and the held-out mean colour are given for scale;
- agreement of the hard cluster map (argmax of the cluster masks, nearest-upsampled) with
  the object label map: adjusted Rand index over all pixels, over foreground pixels
  (FG-ARI), and mean best overlap of objects (setok_eval.metrics.tokenizer).
Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def stage1_shapes_settings(overrides: list[str]) -> tuple[dict[str, Any], Any]:
    """(stage params, TrainerConfig) of `+exp=stage1_shapes`, composed like the launcher does."""
    from omegaconf import OmegaConf

    from setok_experiments.compose import compose_experiment, validate

    cfg = compose_experiment("stage1_shapes", overrides)
    exp = validate(cfg)
    params = OmegaConf.to_container(cfg.stage.params, resolve=True)
    return params, exp.trainer  # type: ignore[return-value]


def held_out(shard_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pixels (M,3,S,S), object_masks (M,O,S,S), object_valid (M,O) of val + test."""
    from setokim.data import make_loader

    pix, masks, valid = [], [], []
    for split in ("val", "test"):
        for batch in make_loader(shard_dir, split, "image", 8, shuffle=False):
            pix.append(batch["pixels"])
            masks.append(batch["object_masks"])
            valid.append(batch["object_valid"])
    width = max(m.shape[1] for m in masks)
    pad = [torch.nn.functional.pad(m, (0, 0, 0, 0, 0, width - m.shape[1])) for m in masks]
    padv = [torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in valid]
    return torch.cat(pix), torch.cat(pad), torch.cat(padv)


def object_labels(masks: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    """(M,O,S,S) masks -> (M,S,S) labels: 0 background, o+1 for object o (later on top)."""
    m = masks.bool() & valid[:, :, None, None].bool()
    idx = torch.arange(1, m.shape[1] + 1)[None, :, None, None]
    return (m.long() * idx).amax(1).numpy()


@torch.no_grad()
def mask_agreement(model: Any, pixels: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    from setok_eval.metrics.tokenizer import adjusted_rand_index, mean_best_overlap, resize_labels

    out = model.setok.tokenize(pixels)
    scores = out.masks.masked_fill(~out.token_mask[:, :, None, None], -1.0)
    grid = scores.argmax(1).numpy()
    ari, fg_ari, mbo, tokens = [], [], [], []
    for i in range(len(pixels)):
        pred = resize_labels(grid[i], labels[i].shape)
        ari.append(adjusted_rand_index(pred, labels[i]))
        fg_ari.append(adjusted_rand_index(pred, labels[i], ignore_label=0))
        mbo.append(mean_best_overlap(pred, labels[i], ignore_label=0))
        tokens.append(int(out.token_mask[i].sum()))
    return {
        "ari": float(np.mean(ari)),
        "fg_ari": float(np.mean(fg_ari)),
        "mbo": float(np.mean(mbo)),
        "tokens": float(np.mean(tokens)),
    }


@torch.no_grad()
def recon_l1(model: Any, pixels: torch.Tensor, steps: int, seed: int) -> float:
    from setokim.stages.stage1 import resize_images

    gen = torch.Generator().manual_seed(seed)
    target = resize_images(pixels, model.diffusion.config.image_size)
    errs = []
    for start in range(0, len(pixels), 8):
        rec = model.diffusion.reconstruct(
            pixels[start : start + 8], model.setok, num_steps=steps, generator=gen
        )
        errs.append((rec - target[start : start + 8]).abs().flatten(1).mean(1))
    return float(torch.cat(errs).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="runs/measure_stage1")
    parser.add_argument("--phase1-steps", type=int, default=100)
    parser.add_argument("--phase2-steps", type=int, default=50)
    parser.add_argument("--sample-steps", type=int, default=20, help="DDIM steps when decoding")
    parser.add_argument("--runs", nargs=2, metavar=("P1", "P2"), help="measure existing runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--phase1-from", help="an existing sub-phase-1 run dir: train only sub-phase 2"
    )
    parser.add_argument("--no-recon", action="store_true", help="skip reconstruction L1")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of +exp=stage1_shapes")
    args = parser.parse_args(argv)

    from setokim.stages.stage1 import build, load_stage1_checkpoint
    from setokim.train import train
    from setokim.train.checkpoint import latest_checkpoint
    from setokim.train.rng import seed_all
    from setokim.utils.io import atomic_write_json

    torch.set_num_threads(1)
    out = Path(args.out_dir)
    params, trainer = stage1_shapes_settings([f"run_root={out}", *args.overrides])
    seconds: dict[str, float] = {}
    if args.runs:
        p1_dir, p2_dir = (Path(p) for p in args.runs)
    else:
        p1_dir, p2_dir = out / "subphase1", out / "subphase2"
        if args.phase1_from:
            p1_dir = Path(args.phase1_from)
            p1_ckpt = latest_checkpoint(p1_dir)
            if p1_ckpt is None:
                parser.error(f"--phase1-from {p1_dir}: the run has no checkpoint")
        else:
            p1 = build({**params, "subphase": 1, "subphase1_batches": 0})
            cfg1 = type(trainer)(
                **{**vars(trainer), "max_steps": args.phase1_steps, "ckpt_every": 0}
            )
            t0 = time.perf_counter()
            p1_ckpt = train(p1, cfg1, p1_dir).checkpoint
            seconds["subphase1"] = time.perf_counter() - t0
        p2 = build({**params, "subphase": 2, "subphase1_batches": 0, "init_from": str(p1_ckpt)})
        cfg2 = type(trainer)(**{**vars(trainer), "max_steps": args.phase2_steps, "ckpt_every": 0})
        t0 = time.perf_counter()
        train(p2, cfg2, p2_dir)
        seconds["subphase2"] = time.perf_counter() - t0

    stage1, after1 = load_stage1_checkpoint(p1_dir, cpu_threads=1)
    _, after2 = load_stage1_checkpoint(p2_dir, cpu_threads=1)
    seed_all(trainer.seed)  # the loop's initialisation: the untrained starting point
    untrained = build({**stage1.describe()["params"], "init_from": None}).build_model().eval()

    pixels, obj_masks, obj_valid = held_out(Path(stage1.cfg.data.shard_dir))
    labels = object_labels(obj_masks, obj_valid)
    size = untrained.diffusion.config.image_size
    from setokim.stages.stage1 import resize_images

    small = resize_images(pixels, size)
    rows: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    for name, model in (("untrained", untrained), ("subphase1", after1), ("subphase2", after2)):
        recon = (
            float("nan") if args.no_recon else recon_l1(model, pixels, args.sample_steps, args.seed)
        )
        rows[name] = {"recon_l1": recon, **mask_agreement(model, pixels, labels)}
    seconds["eval"] = time.perf_counter() - t0
    grey_l1 = float((small - 0.5).abs().mean())
    mean_l1 = float((small - small.mean((0, 2, 3), keepdim=True)).abs().mean())

    print(f"held-out images: {len(pixels)} (val + test), decoder {size}px, "
          f"{args.sample_steps} DDIM steps; flat grey L1 {grey_l1:.4f}, mean colour L1 {mean_l1:.4f}")  # fmt: skip
    print(f"{'model':<11} {'recon L1':>9} {'ARI':>7} {'FG-ARI':>7} {'mBO':>7} {'tokens':>7}")
    for name, r in rows.items():
        print(f"{name:<11} {r['recon_l1']:>9.4f} {r['ari']:>7.3f} {r['fg_ari']:>7.3f} "
              f"{r['mbo']:>7.3f} {r['tokens']:>7.2f}")  # fmt: skip
    result = {
        "benchmark": "measure_stage1",
        "held_out_images": len(pixels),
        "runs": [str(p1_dir), str(p2_dir)],
        "overrides": args.overrides,
        "grey_l1": grey_l1,
        "mean_colour_l1": mean_l1,
        "l1_ratio_subphase2_vs_untrained": rows["subphase2"]["recon_l1"] / rows["untrained"]["recon_l1"],
        "fg_ari_delta_subphase2": rows["subphase2"]["fg_ari"] - rows["subphase1"]["fg_ari"],
        "mbo_delta_subphase2": rows["subphase2"]["mbo"] - rows["subphase1"]["mbo"],
        "rows": rows,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
    }  # fmt: skip
    atomic_write_json(out / "measure_stage1.json", result)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
