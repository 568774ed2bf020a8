"""Do SeTok's tokens carry their objects? Probes on a Stage I run (CPU).

    uv run python benchmarks/probe_tokens.py --stage1-run RUN [--train 512] [--test 256]

For every object of fresh Shapes World scenes: its token (the cluster with the best IoU
with it), whether it owns that token (no other object of the image has that token as its
best), and linear probes (`setok_eval.metrics.probes.linear_probe`, trained on the objects
of `--train` scenes, tested on the objects of `--test` other scenes) for the object's
colour and shape, read from the token and, as the ceiling, from the encoder's mean feature
over the object. Rows: the trained run, and the same configuration untrained (same seed
as the trainer's) as the control; chance is the most frequent training label.

The last line printed is one JSON object (token_owned, token_colour, token_shape, ...).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from setokim.data.shapes_world import World


def scenes(
    root: Path, name: str, count: int, seed: int, image_size: int = 64, world: World | None = None
) -> Path:
    """A Shapes World folder of `count` scenes (val split) of `world` drawn from `seed`."""
    from setokim.data.generate import generate_dataset
    from setokim.data.shards import MANIFEST_NAME

    world = world or World()
    digest = hashlib.sha1(json.dumps(world.as_dict(), sort_keys=True).encode()).hexdigest()[:8]
    tag = "" if world == World() else f"_world{digest}"
    folder = root / f"{name}_{count}_seed{seed}{tag}"
    if not (folder / MANIFEST_NAME).is_file():
        generate_dataset(folder, train=0, val=count, test=0, image_size=image_size, seed=seed,
                         world=world, overwrite=folder.exists())  # fmt: skip
    return folder


def centred_window(mask: torch.Tensor, half: int) -> np.ndarray:
    """The (2*half)^2 window of a (h, w) mask centred on its weighted centroid, flattened:
    a silhouette wherever it lies (what a linear shape probe can read)."""
    ys, xs = torch.nonzero(mask > 0, as_tuple=True)
    if ys.numel() == 0:
        return np.zeros(4 * half * half, dtype=np.float32)
    w = mask[ys, xs]
    cy, cx = int((ys * w).sum() / w.sum()), int((xs * w).sum() / w.sum())
    window = torch.nn.functional.pad(mask, (half, half, half, half))
    return window[cy : cy + 2 * half, cx : cx + 2 * half].flatten().numpy()


@torch.no_grad()
def collect(setok, folder: Path) -> dict[str, np.ndarray]:
    """Token / encoder vectors, the silhouette of each object's best cluster, ownership,
    colour and shape names of every object."""
    from setokim.data import make_loader
    from setokim.model.token_content import object_token_iou, object_vectors

    keys = ("token", "encoder", "cluster", "owned", "colour", "shape")
    out: dict[str, list] = {k: [] for k in keys}
    for batch in make_loader(folder, "val", "image", 32, shuffle=False):
        tok = setok.tokenize(batch["pixels"])
        vec = object_vectors(tok.tokens, tok.token_mask, tok.masks, tok.features,
                             batch["object_masks"], batch["object_valid"])  # fmt: skip
        iou = object_token_iou(tok.masks, tok.token_mask, batch["object_masks"])
        best = iou.masked_fill(~batch["object_valid"][:, None, :], -1.0).argmax(1)  # (B, O)
        half = tok.masks.shape[-1] * 3 // 8 + 1  # a 1.6x large object spans 0.54 of the side
        out["token"].append(vec.token.numpy())
        out["encoder"].append(vec.encoder.numpy())
        out["owned"].append(vec.owned.numpy())
        for b, o in zip(vec.image.tolist(), vec.index.tolist(), strict=True):
            colour, shape = batch["object_names"][b][o].split(" ", 1)  # Shapes World: "red circle"
            out["colour"].append(colour)
            out["shape"].append(shape)
            out["cluster"].append(centred_window(tok.masks[b, best[b, o]].float(), half))
    stacked = ("token", "encoder", "owned")
    return {k: np.concatenate(v) if k in stacked else np.stack(v) if k == "cluster"
            else np.asarray(v) for k, v in out.items()}  # fmt: skip


def probe_row(setok, train: Path, test: Path) -> dict[str, float]:
    from setok_eval.metrics.probes import linear_probe

    a, b = collect(setok, train), collect(setok, test)
    row = {"objects_test": float(len(b["owned"])), "owned": float(b["owned"].mean())}
    for source in ("token", "encoder"):
        for attr in ("colour", "shape"):
            r = linear_probe(a[source], a[attr], b[source], b[attr])
            row[f"{source}_{attr}"] = r.accuracy
            row[f"chance_{attr}"] = r.chance
    # How much shape the clustering leaves: the best cluster's own silhouette, centred.
    row["cluster_shape"] = linear_probe(a["cluster"], a["shape"], b["cluster"], b["shape"]).accuracy
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage1-run", required=True, help="a Stage I run dir or step dir")
    parser.add_argument("--train", type=int, default=512, help="scenes whose objects train")
    parser.add_argument("--test", type=int, default=256, help="scenes whose objects test")
    parser.add_argument("--out-dir", default="runs/probe_tokens")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from setokim.stages.stage1 import load_stage1_checkpoint
    from setokim.train.rng import seed_all

    stage, trained = load_stage1_checkpoint(args.stage1_run, cpu_threads=1)
    root = Path(args.out_dir)
    world = stage.cfg.data.world
    train, test = (
        scenes(root, "probe_train", args.train, 101, world=world),
        scenes(root, "probe_test", args.test, 202, world=world),
    )
    seed_all(0)  # the trainer's default seed: the untrained starting point of the run
    untrained = stage.build_model().eval()
    rows = {"trained": probe_row(trained.setok, train, test),
            "untrained (control)": probe_row(untrained.setok, train, test)}  # fmt: skip
    print(f"{int(rows['trained']['objects_test'])} test objects; chance: colour "
          f"{rows['trained']['chance_colour']:.3f}, shape {rows['trained']['chance_shape']:.3f}")  # fmt: skip
    print(f"{'tokenizer':<20} {'owned':>6} {'colour tok/enc':>15} {'shape tok/enc':>14}"
          f" {'shape of cluster':>17}")  # fmt: skip
    for name, r in rows.items():
        print(f"{name:<20} {r['owned']:>6.3f} {r['token_colour']:>7.3f}/{r['encoder_colour']:<7.3f}"
              f" {r['token_shape']:>6.3f}/{r['encoder_shape']:<7.3f} {r['cluster_shape']:>9.3f}")  # fmt: skip
    t = rows["trained"]
    print(json.dumps({"benchmark": "probe_tokens", "rows": rows, "token_owned": t["owned"],
                      "token_colour": t["token_colour"], "token_shape": t["token_shape"]}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
