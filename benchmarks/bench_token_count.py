"""Does the number of tokens follow the content? (CPU)

    uv run python benchmarks/bench_token_count.py --synthetic-only      # part 1, seconds
    uv run python benchmarks/bench_token_count.py --stage1-run RUN      # + part 2 on a run
    uv run python benchmarks/bench_token_count.py                       # + trains part 2

Part 1, frozen-feature stand-in: scenes of planted groups (`setok_tokenizer.planted`: a
large background plus groups of 6..60 tokens on a 24x24 grid, pairwise cosine 0.75..0.9
inside a group and 0.2..0.3 between groups, at several tightness levels and widths), m = 1..16
groups. For each mechanism: mean |count - m|, Spearman(count, m), and the share of scenes
where one cluster holds two or more whole groups (>= 90% of each).

Part 2, Shapes World after Stage I (`+exp=stage1_shapes`): on the held-out val + test
images, Spearman(tokens, regions) and mean |tokens - regions| (regions = objects +
background), the count after 200 and after 800 sub-phase-2 steps (drift), FG-ARI and mean
best overlap of the hard cluster map with the object map, and a scatter plot (PNG).

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from setok_tokenizer.mechanisms import cluster_features
from setok_tokenizer.planted import planted_scene, swallowed_groups

TIGHTNESS = {
    "loose": (0.75, 0.8),
    "medium": (0.8, 0.85),
    "tight": (0.85, 0.9),
    "mixed": (0.75, 0.9),
}
WIDTHS = (32, 64, 256)


def synthetic_scenes(repeats: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """(features (N,D), labels (N,), m) for m = 1..16 x tightness levels x widths x repeats."""
    gen = torch.Generator().manual_seed(seed)
    scenes = []
    for _ in range(repeats):
        for dim in WIDTHS:
            for tight in TIGHTNESS.values():
                for m in range(1, 17):
                    s = planted_scene(m, dim=dim, tightness=tight, generator=gen)
                    scenes.append((s.features, s.labels, m))
    return scenes


def count_figures(counts: list[int], truth: list[int], swallow: list[bool]) -> dict[str, float]:
    """mean |count - truth|, Spearman, share of swallowing scenes, mean count."""
    c, t = np.asarray(counts, float), np.asarray(truth, float)
    rho = spearmanr(c, t).statistic if c.std() > 0 else float("nan")
    return {
        "mae": float(np.abs(c - t).mean()),
        "spearman": float(rho),
        "swallow": float(np.mean(swallow)),
        "mean_count": float(c.mean()),
    }


def measure_synthetic(repeats: int, seed: int, max_clusters: int) -> dict[str, dict[str, float]]:
    """Part 1: the figures per mechanism over the same scenes."""
    scenes = synthetic_scenes(repeats, seed)
    k = max_clusters
    variants = {
        "dynamic (adaptive, default)": dict(mechanism="dynamic"),
        f"dynamic, old kernel (beta = {k} ln 2)": dict(
            mechanism="dynamic", kernel_scale=k * math.log(2.0)
        ),
        "dynamic, kernel_scale=2": dict(mechanism="dynamic", kernel_scale=2.0),
        "threshold (DPC-KNN, 0.1)": dict(mechanism="threshold"),
        f"fixed ({k})": dict(mechanism="fixed"),
    }
    rows = {}
    for name, kwargs in variants.items():
        counts, truth, swallow = [], [], []
        t0 = time.perf_counter()
        for x, labels, m in scenes:
            out = cluster_features(x[None], max_clusters=k, assignment="hard", **kwargs)
            owner = out.masks[0].argmax(0)
            counts.append(int(out.num_clusters[0]))
            truth.append(m)
            swallow.append(swallowed_groups(labels, owner) >= 2)
        rows[name] = count_figures(counts, truth, swallow)
        rows[name]["seconds"] = time.perf_counter() - t0
    return rows


# ----------------------------------------------------------------------------- part 2
def heldout_scenes(root: Path, count: int, image_size: int):
    """pixels, object masks, object validity of `count` scenes no Stage I run trains on."""
    from measure_stage1 import held_out

    from setokim.data.generate import generate_dataset
    from setokim.data.shards import MANIFEST_NAME

    folder = root / f"heldout_{image_size}px_{count}"
    if not (folder / MANIFEST_NAME).is_file():
        half = count // 2
        generate_dataset(folder, train=0, val=half, test=count - half, image_size=image_size,
                         seed=9_999, overwrite=folder.exists())  # fmt: skip
    return held_out(folder)


@torch.no_grad()
def count_agreement(model, pixels: torch.Tensor, labels: np.ndarray) -> dict[str, object]:
    """Tokens, regions (objects + background) and the hard map's FG-ARI / mBO per image."""
    from setok_eval.metrics.tokenizer import adjusted_rand_index, mean_best_overlap, resize_labels

    tokens, regions, fg_ari, mbo = [], [], [], []
    for start in range(0, len(pixels), 32):
        out = model.setok.tokenize(pixels[start : start + 32])
        scores = out.masks.masked_fill(~out.token_mask[:, :, None, None], -1.0)
        grid = scores.argmax(1).numpy()
        for i in range(len(grid)):
            truth = labels[start + i]
            pred = resize_labels(grid[i], truth.shape)
            tokens.append(int(out.num_tokens[i]))
            regions.append(len(np.unique(truth)))
            fg_ari.append(adjusted_rand_index(pred, truth, ignore_label=0))
            mbo.append(mean_best_overlap(pred, truth, ignore_label=0))
    t, r = np.asarray(tokens, float), np.asarray(regions, float)
    return {
        "tokens": tokens,
        "regions": regions,
        "mean_tokens": float(t.mean()),
        "spearman": float(spearmanr(t, r).statistic),
        "mae": float(np.abs(t - r).mean()),
        "fg_ari": float(np.mean(fg_ari)),
        "mbo": float(np.mean(mbo)),
    }


def scatter_png(tokens: list[int], regions: list[int], path: Path, title: str) -> None:
    """Tokens vs regions per held-out image (jittered), with the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from setokim.utils.io import atomic_write_bytes

    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    r = np.asarray(regions) + rng.uniform(-0.2, 0.2, len(regions))
    t = np.asarray(tokens) + rng.uniform(-0.2, 0.2, len(tokens))
    ax.scatter(r, t, s=10, alpha=0.5)
    top = max(max(regions), max(tokens)) + 1
    ax.plot([0, top], [0, top], color="grey", linewidth=1)
    ax.set_xlabel("regions (objects + background)")
    ax.set_ylabel("tokens")
    ax.set_title(title, fontsize=9)
    buf = __import__("io").BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def measure_shapes(
    stage1_run: str | None, out_dir: Path, overrides: list[str], early: int, heldout: int
) -> dict[str, object]:
    """Part 2: train (or load) `+exp=stage1_shapes` and measure its counts on held-out scenes.

    Training runs sub-phase 1, then `early` sub-phase-2 steps (measured), then resumes the
    same run to the recipe's end (measured again): the drift is the difference of the means.
    """
    from measure_stage1 import object_labels, stage1_shapes_settings

    from setokim.stages.stage1 import build, load_stage1_checkpoint
    from setokim.train import train

    rows: dict[str, dict[str, object]] = {}
    seconds: dict[str, float] = {}
    if stage1_run is None:
        params, trainer = stage1_shapes_settings([f"run_root={out_dir}", *overrides])
        run = out_dir / "stage1"
        stage = build(params)
        phase1 = int(params["subphase1_batches"])
        marks = {"early": phase1 + early, "final": trainer.max_steps}
        every = math.gcd(marks["early"], marks["final"])
        # one uninterrupted run (one LR schedule) that keeps the checkpoints of both marks
        cfg = type(trainer)(**{**vars(trainer), "ckpt_every": every, "keep_last": 10**6})
        t0 = time.perf_counter()
        train(stage, cfg, run)
        seconds["train"] = time.perf_counter() - t0
        pixels, masks, valid = heldout_scenes(out_dir, heldout, stage.cfg.data.image_size)
        labels = object_labels(masks, valid)
        for name, steps in marks.items():
            _, model = load_stage1_checkpoint(
                run / "checkpoints" / f"step_{steps:08d}", cpu_threads=1
            )
            rows[name] = count_agreement(model, pixels, labels)
            rows[name]["subphase2_steps"] = steps - phase1
    else:
        stage, model = load_stage1_checkpoint(stage1_run, cpu_threads=1)
        pixels, masks, valid = heldout_scenes(out_dir, heldout, stage.cfg.data.image_size)
        rows["final"] = count_agreement(model, pixels, object_labels(masks, valid))
    final = rows["final"]
    drift = abs(final["mean_tokens"] - rows["early"]["mean_tokens"]) if "early" in rows else None
    plot = out_dir / "tokens_vs_regions.png"
    scatter_png(final["tokens"], final["regions"], plot,
                f"+exp=stage1_shapes, {len(final['tokens'])} held-out scenes\nSpearman "
                f"{final['spearman']:.2f}, mean |tokens - regions| {final['mae']:.2f}")  # fmt: skip
    return {
        "shapes_rows": {
            k: {m: v for m, v in r.items() if m not in ("tokens", "regions")}
            for k, r in rows.items()
        },  # fmt: skip
        "shapes_plot": str(plot),
        "shapes_seconds": seconds,
        "shapes_spearman": final["spearman"],
        "shapes_mae": final["mae"],
        "shapes_drift": drift,
        "fg_ari": final["fg_ari"],
        "mbo": final["mbo"],
    }


def print_shapes(result: dict[str, object]) -> None:
    print("Part 2: Shapes World after +exp=stage1_shapes, held-out scenes")
    print(
        f"  {'checkpoint':<24} {'tokens':>7} {'|tok-reg|':>9} {'Spearman':>9} {'FG-ARI':>7} {'mBO':>6}"
    )
    for name, r in result["shapes_rows"].items():
        label = f"{name} ({r.get('subphase2_steps', '?')} sub-phase-2 steps)"
        print(f"  {label:<24} {r['mean_tokens']:>7.2f} {r['mae']:>9.2f} {r['spearman']:>9.3f} "
              f"{r['fg_ari']:>7.3f} {r['mbo']:>6.3f}")  # fmt: skip
    print(f"  drift of the mean count: {result['shapes_drift']}; plot: {result['shapes_plot']}")


def print_rows(title: str, rows: dict[str, dict[str, float]]) -> None:
    print(title)
    print(f"  {'mechanism':<36} {'|count-m|':>9} {'Spearman':>9} {'swallow':>8} {'mean':>6}")
    for name, r in rows.items():
        print(f"  {name:<36} {r['mae']:>9.2f} {r['spearman']:>9.3f} {r['swallow']:>8.2f} "
              f"{r['mean_count']:>6.1f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic-only", action="store_true", help="part 1 only (seconds)")
    parser.add_argument("--repeats", type=int, default=2, help="scenes per (m, tightness, width)")
    parser.add_argument("--max-clusters", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage1-run", help="a finished +exp=stage1_shapes run dir to measure")
    parser.add_argument("--out-dir", default="runs/bench_token_count")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--heldout", type=int, default=256, help="held-out scenes (val + test)")
    parser.add_argument(
        "--phase2-early", type=int, default=200, help="sub-phase-2 steps of the early count"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of +exp=stage1_shapes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.synthetic_only and (args.stage1_run or args.overrides):
        parser.error("--synthetic-only measures no Stage I run: drop --stage1-run / overrides")
    synthetic = measure_synthetic(args.repeats, args.seed, args.max_clusters)
    scenes = len(WIDTHS) * len(TIGHTNESS) * 16 * args.repeats
    print_rows(
        f"Part 1: planted groups, {scenes} scenes (m = 1..16; widths {WIDTHS}; "
        f"tightness {', '.join(TIGHTNESS)}), max_clusters={args.max_clusters}",
        synthetic,
    )
    default = synthetic["dynamic (adaptive, default)"]
    result: dict[str, object] = {
        "benchmark": "bench_token_count",
        "synthetic_rows": synthetic,
    }
    if not args.synthetic_only:
        shapes = measure_shapes(
            args.stage1_run, Path(args.out_dir), args.overrides, args.phase2_early, args.heldout
        )
        print_shapes(shapes)
        result.update(shapes)
    result.update(
        synthetic_mae=default["mae"],
        synthetic_spearman=default["spearman"],
        synthetic_swallow=default["swallow"],
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
