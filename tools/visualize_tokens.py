"""Show which image region each SeTok token stands for (the paper's Figure 6).

    python tools/visualize_tokens.py IMAGE... --out tokens.png [--checkpoint DIR]
    python tools/visualize_tokens.py --demo --out tokens.png

One row per image: on the left the photo with every token's region tinted in the token's
own colour (region borders in white), on the right the same regions in solid colour; the
title bar gives the token count. Without --checkpoint a tiny seeded random SeTok is used
(the regions then follow colour and texture only, not learned semantics).
--demo uses photos that ship inside scikit-image (no download).
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TITLE_HEIGHT = 24  # pixels of the title bar above each row
DEMO_IMAGES = ("astronaut", "chelsea", "coffee", "rocket")
TINT = 0.55
RANDOM_KERNEL_SCALE = 2.0  # kernel of the random tiny SeTok used without --checkpoint  # weight of the token colour over the photo on the left panel


def palette(n: int) -> np.ndarray:
    """n distinct RGB colours (n, 3) uint8: golden-angle hues over a few brightness levels.

    Never pure black or white (those are the title and border colours).
    """
    colours: list[tuple[int, int, int]] = []
    seen = {(0, 0, 0), (255, 255, 255)}
    i = 0
    while len(colours) < n:
        hue = (i * 0.61803398875) % 1.0
        sat = (0.85, 0.55, 1.0)[(i // 7) % 3]
        val = (0.95, 0.7, 0.5)[(i // 3) % 3]
        rgb = tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(hue, sat, val))
        if rgb not in seen:
            seen.add(rgb)
            colours.append(rgb)
        i += 1
    return np.array(colours, dtype=np.uint8).reshape(n, 3)


def token_labels(masks: np.ndarray, token_mask: np.ndarray) -> np.ndarray:
    """(K, h, w) masks + (K,) validity -> (h, w) index of the strongest valid token."""
    scores = np.where(token_mask[:, None, None], masks, -np.inf)
    return scores.argmax(axis=0)


def render_row(photo: Image.Image, labels: np.ndarray, title: str, panel: int) -> Image.Image:
    """One output row: tinted photo with borders | solid token colours, under a title."""
    colours = palette(int(labels.max()) + 1)
    label_img = Image.fromarray(labels.astype(np.int32)).resize((panel, panel), Image.NEAREST)
    big = np.asarray(label_img).astype(np.int64)
    solid = colours[big]
    base = np.asarray(photo.convert("RGB").resize((panel, panel), Image.BILINEAR)).astype(float)
    tinted = ((1 - TINT) * base + TINT * solid).round().astype(np.uint8)
    border = np.zeros_like(big, dtype=bool)
    border[:-1] |= big[:-1] != big[1:]
    border[:, :-1] |= big[:, :-1] != big[:, 1:]
    tinted[border] = 255
    row = Image.new("RGB", (2 * panel, panel + TITLE_HEIGHT), "white")
    row.paste(Image.fromarray(tinted), (0, TITLE_HEIGHT))
    row.paste(Image.fromarray(solid), (panel, TITLE_HEIGHT))
    ImageDraw.Draw(row).text((4, 6), title, fill="black")
    return row


def load_images(paths: list[str], demo: bool) -> list[tuple[str, Image.Image]]:
    """(name, RGB image) pairs from files and/or scikit-image's shipped photos."""
    images = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"IMAGE not found: {p}")
        with Image.open(path) as img:
            images.append((path.name, img.convert("RGB")))
    if demo:
        from skimage import data  # lazy: only the demo needs scikit-image

        images += [
            (name, Image.fromarray(getattr(data, name)()).convert("RGB")) for name in DEMO_IMAGES
        ]
    if not images:
        raise ValueError("give at least one IMAGE or --demo")
    return images


def build_tokenizer(checkpoint: str | None, max_clusters: int | None, seed: int):
    """SeTok from a checkpoint directory, or a tiny seeded random one (announced on stdout)."""
    import torch

    from setok_tokenizer import ClusteringConfig, EncoderConfig, SeTok, SeTokConfig

    if checkpoint is not None:
        model = SeTok.from_pretrained(checkpoint)
        print(f"loaded SeTok checkpoint {checkpoint}")
    else:
        torch.manual_seed(seed)
        # A wider kernel than the default (k ln 2) lets the counts vary with random features.
        cfg = SeTokConfig(
            encoder=EncoderConfig(image_size=128),
            clustering=ClusteringConfig(kernel_scale=RANDOM_KERNEL_SCALE),
        )
        model = SeTok(cfg)
        print(
            f"no --checkpoint: using a tiny random SeTok (seed {seed}, kernel_scale "
            f"{RANDOM_KERNEL_SCALE}); its regions follow colour and texture, not semantics"
        )
    if max_clusters is not None:
        if model.cfg.clustering.mechanism == "resampler":
            raise ValueError("--max-clusters cannot change a resampler's number of queries")
        if max_clusters < 2:
            raise ValueError(f"--max-clusters must be >= 2, got {max_clusters}")
        model.cfg = replace(
            model.cfg, clustering=replace(model.cfg.clustering, max_clusters=max_clusters)
        )
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files to tokenize")
    parser.add_argument("--out", required=True, help="output PNG file")
    parser.add_argument("--checkpoint", help="SeTok.save_pretrained directory")
    parser.add_argument("--max-clusters", type=int, help="override the clustering's max_clusters")
    parser.add_argument("--demo", action="store_true", help="add scikit-image's shipped photos")
    parser.add_argument("--panel-size", type=int, default=256, help="pixels per panel side")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tiny SeTok")
    args = parser.parse_args(argv)
    if args.panel_size < 16:
        parser.error(f"--panel-size must be >= 16, got {args.panel_size}")

    import torch
    from tqdm import tqdm

    from setokim.utils.io import atomic_write_bytes

    images = load_images(args.images, args.demo)
    model = build_tokenizer(args.checkpoint, args.max_clusters, args.seed)
    rows, counts = [], []
    for name, img in tqdm(images, desc="tokenizing", unit="image", file=sys.stderr):
        with torch.no_grad():
            out = model.tokenize([img])
        n = int(out.num_tokens[0])
        labels = token_labels(out.masks[0].float().numpy(), out.token_mask[0].numpy())
        rows.append(render_row(img, labels, f"{name}: {n} tokens", args.panel_size))
        counts.append(n)
        print(f"{name}: {n} tokens")
    sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for i, row in enumerate(rows):
        sheet.paste(row, (0, i * row.height))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(args.out, buf.getvalue())
    summary = {"out": str(args.out), "images": [n for n, _ in images], "num_tokens": counts}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
