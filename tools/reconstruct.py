"""Reconstruct images through a Stage I checkpoint: SeTok tokens -> diffusion decoder.

    python tools/reconstruct.py CKPT IMAGE... --out recon.png [--steps 25] [--guidance 3]

CKPT is a Stage I run directory (its latest checkpoint), one of its checkpoint step
directories, or a directory written by `setokim.stages.stage1.export_parts`. The output
PNG has the originals in the top row and their reconstructions below, each cell at the
tokenizer's input resolution. The file is written atomically.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm


def load_images(paths: list[str], size: int) -> torch.Tensor:
    """Image files -> (B, 3, size, size) float in [0, 1] (RGB, bilinear resize)."""
    out = []
    for i, path in enumerate(paths):
        try:
            img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
        except (OSError, ValueError) as err:
            raise ValueError(f"IMAGES[{i}]: cannot read {path!r}: {err}") from None
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)


def load_model(ckpt: str) -> torch.nn.Module:
    """A Stage1Model from a run dir, a step dir or an `export_parts` directory."""
    from setokim.stages.stage1 import load_parts, load_stage1_checkpoint

    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"CKPT: {ckpt} does not exist")
    if (path / "tokenizer").is_dir() and (path / "diffusion").is_dir():
        return load_parts(path)
    _, model = load_stage1_checkpoint(path, cpu_threads=None)
    return model


def grid_png(originals: torch.Tensor, recons: torch.Tensor) -> bytes:
    """Two rows (originals, reconstructions) of (B, 3, S, S) images in [0, 1] -> PNG bytes."""
    size = originals.shape[-1]
    if recons.shape[-1] != size:
        recons = F.interpolate(recons, size=(size, size), mode="bilinear", align_corners=False)
    rows = [torch.cat(list(t.clamp(0, 1)), dim=2) for t in (originals, recons)]
    grid = (torch.cat(rows, dim=1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue()


def reconstruct(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    steps: int | None,
    guidance: float | None,
    seed: int,
    batch_size: int = 8,
) -> torch.Tensor:
    """Decode every image from its own SeTok tokens; (B, 3, S, S) -> (B, 3, S_dec, S_dec)."""
    out = []
    gen = torch.Generator().manual_seed(seed)
    for start in tqdm(range(0, len(images), batch_size), desc="reconstruct", leave=False):
        chunk = images[start : start + batch_size]
        out.append(
            model.diffusion.reconstruct(
                chunk, model.setok, num_steps=steps, guidance_scale=guidance, generator=gen
            )
        )
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", metavar="CKPT", help="Stage I run/step dir or export_parts dir")
    parser.add_argument("images", metavar="IMAGES", nargs="+", help="image files")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (config default)")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (1 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)

    from setokim.utils.io import atomic_write_bytes

    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    model = load_model(args.ckpt)
    images = load_images(args.images, model.setok.encoder.image_size)
    recons = reconstruct(model, images, steps=args.steps, guidance=args.guidance, seed=args.seed)
    atomic_write_bytes(args.out, grid_png(images, recons))
    print(f"wrote {args.out}: {len(images)} originals above their reconstructions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
