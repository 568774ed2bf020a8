"""Which sub-phase-2 objective keeps Stage I's token count honest? (CPU, encoder only)

    uv run python benchmarks/study_count_objective.py VARIANT [--steps 800] [--every 200]

Trains only the tiny encoder of `+exp=stage1_shapes` (16x16 grid, or `--patch`; adaptive clustering,
knn_k 3, up to 12 clusters) on 1,024 Shapes World scenes with one objective, and every
`--every` steps measures on 256 held-out scenes: mean tokens, |tokens - regions|,
Spearman(tokens, regions), FG-ARI and mean best overlap. Variants:

- kl: the mask-consistency KL on the hard (straight-through) masks, as Stage I computes it
  (a 1e-4 floor on every valid cluster's mask keeps its gradient finite);
- kl_soft: the same KL on the soft masks (no floor needed);
- group: `object_grouping_loss` on the encoder features;
- group_kl: both, weight 1 each;
- old_kl: the KL with the earlier fixed kernel (kernel_scale = 12 ln 2).

The last line printed is one JSON object with every measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from bench_token_count import count_agreement
from measure_stage1 import held_out, object_labels

VARIANTS = ("kl", "kl_soft", "group", "group_kl", "old_kl")
MAX_CLUSTERS = 12


class EncoderOnly(torch.nn.Module):
    """What count_agreement reads: `.setok`."""

    def __init__(self, setok) -> None:
        super().__init__()
        self.setok = setok


def dataset(root: Path, name: str, **sizes: int) -> Path:
    from setokim.data.generate import generate_dataset
    from setokim.data.shards import MANIFEST_NAME

    folder = root / name
    if not (folder / MANIFEST_NAME).is_file():
        generate_dataset(folder, image_size=64, seed=0, overwrite=folder.exists(), **sizes)
    return folder


def objective(variant: str, setok, x: torch.Tensor, objects: torch.Tensor, valid: torch.Tensor):
    from setok_decoders.losses import mask_consistency_kl, object_grouping_loss
    from setok_tokenizer.mechanisms import cluster_features

    c = setok.cfg.clustering
    loss = x.sum() * 0.0
    if variant in ("group", "group_kl"):
        loss = loss + object_grouping_loss(x, objects, valid)
    if variant in ("kl", "group_kl", "old_kl"):
        out, _ = setok.cluster(x)
        k = int(out.num_clusters.max())
        floor = 1e-4 * out.cluster_valid[:, :k, None].float()
        loss = loss + mask_consistency_kl(
            out.masks[:, :k].float() + floor, out.cluster_valid[:, :k], objects, valid
        )
    if variant == "kl_soft":
        out = cluster_features(
            x, "dynamic", max_clusters=c.max_clusters, knn_k=c.knn_k, assignment="soft"
        )
        k = int(out.num_clusters.max())
        loss = loss + mask_consistency_kl(
            out.masks[:, :k].float(), out.cluster_valid[:, :k], objects, valid
        )
    return loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--patch", type=int, default=4, help="encoder patch size (64 px images)")
    parser.add_argument("--out-dir", default="runs/study_count_objective")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from setok_decoders.losses import resize_masks
    from setok_tokenizer import ClusteringConfig, EncoderConfig, SeTok, SeTokConfig
    from setokim.data import make_loader

    root = Path(args.out_dir)
    train_dir = dataset(root, "train_1024", train=1024, val=8, test=8)
    pixels, masks, valid = held_out(dataset(root, "heldout_256", train=16, val=128, test=128))
    labels = object_labels(masks, valid)
    torch.manual_seed(0)
    kernel = MAX_CLUSTERS * math.log(2.0) if args.variant == "old_kl" else None
    setok = SeTok(
        SeTokConfig(
            encoder=EncoderConfig(freeze=False, overrides={"patch_size": args.patch}),
            clustering=ClusteringConfig(
                max_clusters=MAX_CLUSTERS, assignment="hard", knn_k=3, kernel_scale=kernel
            ),
        )
    )
    model = EncoderOnly(setok)
    opt = torch.optim.AdamW(setok.encoder.parameters(), lr=2e-3, weight_decay=1e-3)
    grid = setok.grid_size
    rows = []

    def measure(step: int) -> None:
        setok.eval()
        row = count_agreement(model, pixels, labels)
        row = {k: v for k, v in row.items() if k not in ("tokens", "regions")} | {"step": step}
        rows.append(row)
        print(f"{args.variant} step {step:4d} tokens {row['mean_tokens']:.2f} "
              f"|tok-reg| {row['mae']:.2f} Spearman {row['spearman']:.3f} "
              f"FG-ARI {row['fg_ari']:.3f} mBO {row['mbo']:.3f}", flush=True)  # fmt: skip
        setok.train()

    measure(0)
    step, t0 = 0, time.perf_counter()
    epoch = 0
    while step < args.steps:
        for batch in make_loader(train_dir, "train", "image", 16, shuffle=True, epoch=epoch):
            features = setok.encoder(setok.preprocess(batch["pixels"]))
            x = setok.normalise(features.flatten(1, 2))
            objects = resize_masks(batch["object_masks"].float(), grid).flatten(2)
            loss = objective(args.variant, setok, x, objects, batch["object_valid"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % args.every == 0:
                measure(step)
            if step >= args.steps:
                break
        epoch += 1
    print(
        json.dumps(
            {
                "variant": args.variant,
                "patch": args.patch,
                "seconds": time.perf_counter() - t0,
                "rows": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
