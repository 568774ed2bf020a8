"""Show which image region each SeTok token stands for (the paper's Figure 6).

    python tools/visualize_tokens.py IMAGE... --out tokens.png [--checkpoint DIR]
    python tools/visualize_tokens.py --demo --out tokens.png
    python tools/visualize_tokens.py --demo --encoder-path DIR --out tokens.png

One row per image: on the left the image with every token's region tinted in the token's
own colour (region borders in white), on the right the same regions in solid colour; the
title bar gives the token count.

--demo trains a tiny tokenizer on Shapes World on the spot (about a minute on a CPU: its
encoder learns one feature peak per object, `object_grouping_loss`) and draws held-out
scenes it never saw, with their true region count. With --encoder-path it instead draws the
photos that ship inside scikit-image (no download) through that local encoder. Without
--checkpoint or --encoder-path the features are a tiny random encoder's, and every title
says "untrained features": such regions follow colour and texture, not semantics.
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
TINT = 0.55  # weight of the token colour over the photo on the left panel
DEMO_SCENES = 6  # held-out Shapes World scenes drawn by --demo


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


def load_images(paths: list[str], photos: bool) -> list[tuple[str, Image.Image]]:
    """(name, RGB image) pairs from files and/or scikit-image's shipped photos."""
    images = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"IMAGE not found: {p}")
        with Image.open(path) as img:
            images.append((path.name, img.convert("RGB")))
    if photos:
        from skimage import data  # lazy: only the demo needs scikit-image

        images += [
            (name, Image.fromarray(getattr(data, name)()).convert("RGB")) for name in DEMO_IMAGES
        ]
    return images


def demo_scenes(count: int, seed: int, size: int = 64) -> list[tuple[str, Image.Image, int]]:
    """(name, image, true region count) of Shapes World scenes drawn from `seed`."""
    from setokim.data.shapes_world import render, sample_scene

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        pixels, masks = render(sample_scene(rng), size)
        regions = len(masks) + int((~masks.any(0)).any())  # objects + background
        out.append((f"held-out scene {i}", Image.fromarray(pixels), regions))
    return out


def train_demo_tokenizer(steps: int, seed: int):
    """A tiny SeTok whose encoder learns one feature peak per Shapes World object.

    Scenes are rendered on the fly (never the held-out seed); the loss is
    `object_grouping_loss` on the encoder grid, which is what makes the adaptive clustering
    count objects (benchmarks/bench_token_count.py).
    """
    import torch
    from tqdm import tqdm

    from setok_decoders.losses import object_grouping_loss, resize_masks
    from setok_tokenizer import ClusteringConfig, EncoderConfig, SeTok, SeTokConfig
    from setokim.data.shapes_world import render, sample_scene

    torch.manual_seed(seed)
    cfg = SeTokConfig(
        encoder=EncoderConfig(image_size=64, freeze=False, overrides={"patch_size": 4}),
        clustering=ClusteringConfig(max_clusters=12, knn_k=3),
    )
    model = SeTok(cfg)
    opt = torch.optim.AdamW(model.encoder.parameters(), lr=2e-3, weight_decay=1e-3)
    rng = np.random.default_rng(seed + 1)
    grid = model.grid_size
    for _ in tqdm(range(steps), desc="training the demo tokenizer", file=sys.stderr):
        scenes = [render(sample_scene(rng), 64) for _ in range(16)]
        pixels = torch.stack([torch.from_numpy(p).permute(2, 0, 1) for p, _ in scenes])
        most = max(len(m) for _, m in scenes)
        masks = torch.zeros(16, most, 64, 64)
        valid = torch.zeros(16, most, dtype=torch.bool)
        for b, (_, m) in enumerate(scenes):
            masks[b, : len(m)] = torch.from_numpy(m).float()
            valid[b, : len(m)] = True
        features = model.encoder(model.preprocess(pixels))
        x = model.normalise(features.flatten(1, 2))
        loss = object_grouping_loss(x, resize_masks(masks, grid).flatten(2), valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def build_tokenizer(
    checkpoint: str | None,
    encoder_path: str | None,
    encoder_family: str,
    max_clusters: int | None,
    seed: int,
):
    """(SeTok, untrained?) from a checkpoint, a local encoder, or a tiny seeded random one."""
    import torch

    from setok_tokenizer import EncoderConfig, SeTok, SeTokConfig

    untrained = False
    if checkpoint is not None:
        model = SeTok.from_pretrained(checkpoint)
        print(f"loaded SeTok checkpoint {checkpoint}")
    elif encoder_path is not None:
        torch.manual_seed(seed)
        encoder = EncoderConfig(family=encoder_family, pretrained_path=encoder_path)
        model = SeTok(SeTokConfig(encoder=encoder))
        print(f"encoder {encoder_family} from {encoder_path} (merger untrained; regions only)")
    else:
        torch.manual_seed(seed)
        model = SeTok(SeTokConfig(encoder=EncoderConfig(image_size=128)))
        untrained = True
        print(
            f"no --checkpoint: using a tiny random SeTok (seed {seed}); untrained features: "
            "its regions follow colour and texture, not semantics"
        )
    if max_clusters is not None:
        if model.cfg.clustering.mechanism == "resampler":
            raise ValueError("--max-clusters cannot change a resampler's number of queries")
        if max_clusters < 2:
            raise ValueError(f"--max-clusters must be >= 2, got {max_clusters}")
        model.cfg = replace(
            model.cfg, clustering=replace(model.cfg.clustering, max_clusters=max_clusters)
        )
    return model.eval(), untrained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files to tokenize")
    parser.add_argument("--out", required=True, help="output PNG file")
    parser.add_argument("--checkpoint", help="SeTok.save_pretrained directory")
    parser.add_argument("--max-clusters", type=int, help="override the clustering's max_clusters")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="train a tiny tokenizer on Shapes World now and draw held-out scenes "
        "(with --encoder-path: scikit-image's shipped photos through that encoder)",
    )
    parser.add_argument("--encoder-path", help="a local transformers vision encoder directory")
    parser.add_argument("--encoder-family", default="vit", help="family of --encoder-path")
    parser.add_argument("--demo-steps", type=int, default=200, help="training steps of --demo")
    parser.add_argument("--panel-size", type=int, default=256, help="pixels per panel side")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tiny SeTok")
    args = parser.parse_args(argv)
    if args.panel_size < 16:
        parser.error(f"--panel-size must be >= 16, got {args.panel_size}")

    import torch
    from tqdm import tqdm

    from setokim.utils.io import atomic_write_bytes

    if args.demo_steps < 1:
        parser.error(f"--demo-steps must be >= 1, got {args.demo_steps}")
    photos = args.demo and args.encoder_path is not None
    images = [(name, img, None) for name, img in load_images(args.images, photos)]
    trained_demo = args.demo and args.encoder_path is None and args.checkpoint is None
    if trained_demo:
        model, untrained = train_demo_tokenizer(args.demo_steps, args.seed), False
        images += demo_scenes(DEMO_SCENES, seed=10_000 + args.seed)
    elif args.demo and args.encoder_path is None:
        images += demo_scenes(DEMO_SCENES, seed=10_000 + args.seed)
    if not images:
        parser.error("give at least one IMAGE or --demo")
    if not trained_demo:
        model, untrained = build_tokenizer(
            args.checkpoint, args.encoder_path, args.encoder_family, args.max_clusters, args.seed
        )
    rows, counts = [], []
    for name, img, regions in tqdm(images, desc="tokenizing", unit="image", file=sys.stderr):
        with torch.no_grad():
            out = model.tokenize([img])
        n = int(out.num_tokens[0])
        labels = token_labels(out.masks[0].float().numpy(), out.token_mask[0].numpy())
        title = f"{name}: {n} tokens"
        if regions is not None:
            title += f" ({regions} regions)"
        if untrained:
            title += " - untrained features"
        rows.append(render_row(img, labels, title, args.panel_size))
        counts.append(n)
        print(title)
    sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    for i, row in enumerate(rows):
        sheet.paste(row, (0, i * row.height))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(args.out, buf.getvalue())
    summary = {"out": str(args.out), "images": [n for n, _, _ in images], "num_tokens": counts}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
