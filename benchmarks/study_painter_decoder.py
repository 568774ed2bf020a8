#!/usr/bin/env python
"""Can Stage I's token painter draw the objects, so that it can decode generated images?

The painter trained in Stage I's sub-phase 2 reconstructs the background of a scene and
leaves its objects out (benchmarks/RESULTS.md, session 9): the objects are a few percent of
the pixels. This study fits the exported painter further on the frozen SeTok's tokens of
training images, with the squared error of object pixels weighted by each variant's
`--object-weights`, and measures on held-out test images: reconstruction L1 (all pixels
and object pixels), and the share of objects whose painted colour (the most frequent
Shapes World colour inside the object's mask, `setok_eval.metrics.colour`) is the object's
true colour. Controls: flat grey, and the painter as exported. `--out` keeps the best
variant's painter (by object colour) for `stage2.image_decoder`-style use.

    uv run python benchmarks/study_painter_decoder.py --export STAGE1_EXPORT --shards SHARDS \
        --steps 1500 --object-weights 1 10 --out runs/painter_fit
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def collect(shards: Path, split: str, images: int, setok: Any, size: int) -> dict[str, Any]:
    """Frozen tokens of the first `images` of a split, with targets at the painter's size."""
    from setokim.data.config import DataConfig
    from setokim.stages.common import endless_batches

    data = DataConfig(shard_dir=str(shards), split=split, task="image", shuffle=False)
    out: dict[str, list] = {"tokens": [], "valid": [], "target": [], "objects": []}
    seen = 0
    with torch.no_grad():
        for batch in endless_batches(data, 0, 1, 0, 32):
            pixels = batch["pixels"]
            tok = setok.tokenize(pixels)
            masks = batch["object_masks"].float() * batch["object_valid"][..., None, None]
            out["tokens"].append(tok.tokens)
            out["valid"].append(tok.token_mask.bool())
            out["target"].append(F.interpolate(pixels, size=size, mode="area"))
            out["objects"].append(F.interpolate(masks, size=size, mode="area") > 0.5)
            seen += pixels.shape[0]
            if seen >= images:
                break
    width = max(t.shape[1] for t in out["tokens"])
    objects = max(m.shape[1] for m in out["objects"])

    def pad(parts: list, length: int, value: Any) -> torch.Tensor:
        return torch.cat(
            [
                F.pad(p, (0, 0) * (p.dim() - 2) + (0, length - p.shape[1]), value=value)
                for p in parts
            ]
        )

    return {
        "tokens": pad(out["tokens"], width, 0.0)[:images],
        "valid": pad(out["valid"], width, False)[:images],
        "target": torch.cat(out["target"])[:images],
        "objects": pad(out["objects"], objects, False)[:images],
    }


def fit(
    painter: Any, train: dict[str, Any], steps: int, weight: float, lr: float, batch: int
) -> Any:
    """`painter` fitted further: squared error with object pixels weighted by `weight`."""
    painter = copy.deepcopy(painter).train()
    optim = torch.optim.Adam(painter.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    n = train["tokens"].shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        painted, _ = painter(train["tokens"][idx], train["valid"][idx])
        on_object = train["objects"][idx].any(1, keepdim=True).float()
        w = 1.0 + (weight - 1.0) * on_object
        loss = (w * (painted - train["target"][idx]) ** 2).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
    return painter.eval()


def _inside(image: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """The pixels of (3, S, S) `image` under `mask`, as an (N, 1, 3) image."""
    return image.permute(1, 2, 0)[mask].numpy()[:, None, :]


def scores(images: torch.Tensor, test: dict[str, Any], palette: dict[str, Any]) -> dict[str, float]:
    """L1 (all / object pixels) and the share of objects painted in their true colour."""
    from setok_eval.metrics.colour import dominant_colour

    target, objects = test["target"], test["objects"]
    diff = (images - target).abs().mean(1)  # (B, S, S)
    any_object = objects.any(1)
    hits, total = 0, 0
    for b in range(images.shape[0]):
        for mask in objects[b]:
            if not bool(mask.any()):
                continue

            truth = dominant_colour(_inside(target[b], mask), palette["colours"], {})
            drawn = dominant_colour(
                _inside(images[b], mask), palette["colours"], palette["background"]
            )
            hits += int(drawn == truth)
            total += 1
    return {
        "l1": float(diff.mean()),
        "l1_objects": float(diff[any_object].mean()),
        "object_colour": hits / max(total, 1),
        "objects": float(total),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, required=True, help="Stage I export with painter/")
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--train-images", type=int, default=2048)
    parser.add_argument("--test-images", type=int, default=96)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--object-weights", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument("--out", type=Path, help="save the best variant's painter here")
    args = parser.parse_args()
    from setok_decoders.painter import TokenPainter
    from setok_eval.registry import load_task
    from setok_tokenizer import SeTok

    if not (args.export / "painter").is_dir():
        parser.error(f"--export {args.export}: no painter/ (a Stage I run with painter_weight > 0)")
    torch.manual_seed(0)
    setok = SeTok.from_pretrained(args.export / "tokenizer").eval()
    painter = TokenPainter.from_pretrained(args.export / "painter")
    size = painter.config.image_size
    palette = dict(load_task(Path(__file__).resolve().parents[1] / "eval_suite" / "tasks"
                             / "shapes_t2i.yaml").metric("colour_match").args)  # fmt: skip
    train = collect(args.shards, "train", args.train_images, setok, size)
    test = collect(args.shards, "test", args.test_images, setok, size)

    def painted(p: Any) -> torch.Tensor:
        with torch.no_grad():
            return p.decode(test["tokens"], test["valid"])

    rows = {"flat grey": scores(torch.full_like(test["target"], 0.5), test, palette),
            "painter as exported": scores(painted(painter), test, palette)}  # fmt: skip
    fitted = {}
    for weight in args.object_weights:
        t0 = time.perf_counter()
        fitted[weight] = fit(painter, train, args.steps, weight, args.lr, args.batch_size)
        name = f"fitted {args.steps} steps, object weight {weight:g}"
        rows[name] = {**scores(painted(fitted[weight]), test, palette),
                      "seconds": time.perf_counter() - t0}  # fmt: skip
    print(f"\n{'variant':44s} {'L1':>7s} {'L1 obj':>7s} {'obj colour':>10s}")
    for name, r in rows.items():
        print(f"{name:44s} {r['l1']:7.3f} {r['l1_objects']:7.3f} {r['object_colour']:10.3f}")
    if args.out is not None and fitted:
        best = max(
            fitted,
            key=lambda w: rows[f"fitted {args.steps} steps, object weight {w:g}"]["object_colour"],
        )
        fitted[best].save_pretrained(args.out)
        print(f"saved the object-weight {best:g} painter to {args.out}")
    print(json.dumps({"benchmark": "study_painter_decoder", "export": str(args.export),
                      "steps": args.steps, "rows": rows}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
