"""What makes Stage I's tokens carry their objects? (CPU, tokenizer + decoders, no LLM)

    uv run python benchmarks/study_token_content.py VARIANT [--steps 600] [--width 32]

Trains the tiny SeTok of `+exp=stage1_shapes` (adaptive clustering, knn_k 3, 16x16 grid)
on Shapes World with the grouping term plus one mask objective, then probes its tokens on
held-out objects (`probe_tokens.probe_row`: the object owns its token; linear probes for
colour and shape from the token and from the encoder's mean feature). Variants:

- group: the grouping term alone (what the count needs, nothing asks for content);
- pixel: + the Mask2Former-style mask decoder (queries attend to the encoder features);
- token: + the same decoder with `pixel_context=False` (the mask from the token alone);
- token_match: `token`, each token matched to the object its cluster covers (`match_on`);
- token_diffusion: `token_match` + the tiny diffusion decoder's eps loss (Stage I as a whole);
- attr / attr_token_match: `group` / `token_match` + linear colour and shape classifiers on
  the encoder's mean feature over each object (the names a caption gives it: the stand-in
  for the semantics the paper's CLIP-pretrained encoder brings);
- name_token_match: `token_match` + the same classifiers on each object's token (the
  token whose cluster overlaps it best), i.e. through the merger;
- painter: `pixel` + the token painter (`setok_decoders.painter`): each token paints its
  own layer of the image from (token, position) alone, trained to reconstruct the pixels;
- ceiling: no training: the same linear shape probe on each object's true visible mask
  (a window centred on it) at 16x16 (the token grid; also binarised at 0.5, as a hard
  cluster is), 32x32 and 64x64 (the pixels): how much shape a linear read-out of the
  footprint itself can give.

The last line printed is one JSON object with the probes and the seconds per step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from probe_tokens import centred_window, probe_row, scenes  # the script's folder is on sys.path

from setokim.data.shapes_world import World

VARIANTS = (
    "group",
    "pixel",
    "token",
    "token_match",
    "token_diffusion",
    "attr",
    "attr_token_match",
    "name_token_match",
    "painter",
    "ceiling",
)
DECODER_YAML = Path(__file__).resolve().parents[1] / "experiments/conf/decoder/stage1_tiny.yaml"


def footprints(folder: Path, grid: int, binary: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Each object's visible mask at `grid` (area-resized; `binary`: > 0.5, as a hard cluster
    would be), in a window centred on it, and its shape name."""
    from setok_decoders import resize_masks
    from setokim.data import make_loader

    half = grid * 3 // 8 + 1  # a 1.6x large object spans 0.54 of the side
    rows, names = [], []
    for batch in make_loader(folder, "val", "image", 64, shuffle=False):
        masks = resize_masks(batch["object_masks"].float(), (grid, grid))
        if binary:
            masks = (masks > 0.5).float()
        for b, o in batch["object_valid"].nonzero().tolist():
            rows.append(centred_window(masks[b, o], half))
            names.append(batch["object_names"][b][o].split(" ", 1)[1])
    return np.stack(rows), np.asarray(names)


def study_data(root: Path, size: int, world: World) -> tuple[Path, Path, Path]:
    """(2,048 training scenes, 512 probe-training scenes, 256 probe-test scenes) of `world`
    under `root`, generated once and reused."""
    from setokim.data.generate import generate_dataset
    from setokim.data.shards import MANIFEST_NAME

    tag = hashlib.sha1(json.dumps(world.as_dict(), sort_keys=True).encode()).hexdigest()[:8]
    train_dir = root / f"train_2048_s{size}_world{tag}"
    if not (train_dir / MANIFEST_NAME).is_file():
        generate_dataset(train_dir, train=2048, val=8, test=8, image_size=size, seed=0,
                         world=world, overwrite=train_dir.exists())  # fmt: skip
    probe_train = scenes(root, f"probe_train_s{size}", 512, 101, size, world)
    probe_test = scenes(root, f"probe_test_s{size}", 256, 202, size, world)
    return train_dir, probe_train, probe_test


def encoder_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The tiny encoder's transformers config for --family, --patch, --width and --layers."""
    if args.family == "convnext":
        return {"patch_size": args.patch // 2, "hidden_sizes": [args.width] * 2,
                "depths": [args.layers] * 2}  # fmt: skip
    return {"patch_size": args.patch, "hidden_size": args.width,
            "intermediate_size": 2 * args.width, "num_hidden_layers": args.layers}  # fmt: skip


def shape_ceiling(train: Path, test: Path) -> dict[str, float]:
    from setok_eval.metrics.probes import linear_probe

    out = {}
    for grid, binary in ((16, False), (16, True), (32, False), (64, False)):
        (xa, ya), (xb, yb) = footprints(train, grid, binary), footprints(test, grid, binary)
        probe = linear_probe(xa, ya, xb, yb)
        name = f"mask{grid}{'_binary' if binary else ''}_shape"
        out[name], out["chance_shape"] = probe.accuracy, probe.chance
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=32, help="encoder hidden size")
    parser.add_argument("--layers", type=int, default=2, help="encoder depth")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument(
        "--family", choices=("vit", "convnext"), default="vit",
        help="convnext: 2 stages of --layers blocks, --width wide, stem patch --patch/2 "
        "(the same grid as the ViT)",
    )  # fmt: skip
    parser.add_argument(
        "--world", type=World.from_json, default=World(),
        help='the Shapes World, JSON: {"shapes": [...], "object_scale": 1.6, "max_rotation": 0}',
    )  # fmt: skip
    parser.add_argument("--merger-blocks", type=int, default=1)
    parser.add_argument(
        "--relative-pe", action="store_true", help="the merger's centroid-relative PE"
    )
    parser.add_argument(
        "--centred-painter", action="store_true", help="the painter paints around centroids"
    )
    parser.add_argument(
        "--init-encoder", type=Path, default=None,
        help="a torch state dict of the encoder to start from (e.g. attribute-pretrained)",
    )  # fmt: skip
    parser.add_argument(
        "--freeze-encoder", action="store_true", help="the encoder does not train (sub-phase 1)"
    )
    parser.add_argument(
        "--attr-weight", type=float, default=0.0,
        help="+ this weight x the attribute heads' loss on the encoder's object means",
    )  # fmt: skip
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out-dir", default="runs/study_token_content")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from setok_decoders import mask_centroids, mask_loss, object_grouping_loss, resize_masks
    from setok_tokenizer import ClusteringConfig, EncoderConfig, MergerConfig, SeTokConfig
    from setokim.data import make_loader
    from setokim.stages.stage1 import build_parts, resize_images

    size = args.image_size
    train_dir, probe_train, probe_test = study_data(Path(args.out_dir), size, args.world)
    if args.variant == "ceiling":
        row = shape_ceiling(probe_train, probe_test)
        print(f"ceiling: linear shape probe on the true visible mask {row}")
        print(json.dumps({"variant": "ceiling", **row}))
        return 0

    torch.manual_seed(0)
    tok_cfg = SeTokConfig(
        encoder=EncoderConfig(freeze=False, image_size=size, family=args.family,
                              overrides=encoder_overrides(args)),  # fmt: skip
        clustering=ClusteringConfig(max_clusters=12, assignment="hard", knn_k=3),
        merger=MergerConfig(
            num_blocks=args.merger_blocks, num_heads=2, relative_pe=args.relative_pe
        ),
    )
    decoder = yaml.safe_load(DECODER_YAML.read_text(encoding="utf-8"))
    decoder["mask"]["pixel_context"] = args.variant in ("pixel", "painter")
    decoder.setdefault("painter", {})["centred"] = args.centred_painter
    setok, diffusion, mask_decoder, painter = build_parts(
        tok_cfg, decoder, painter=args.variant == "painter"
    )
    from setokim.data.shapes_world import COLORS, SHAPES

    vocab = {"colour": list(COLORS), "shape": list(SHAPES)}
    width = setok.output_dim if args.variant.startswith("name") else setok.encoder.feature_dim
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in vocab.items()})
    modules = [setok]
    if args.variant not in ("group", "attr"):
        modules.append(mask_decoder)
    if args.variant.startswith(("attr", "name")) or args.attr_weight > 0:
        modules.append(heads)
    if args.variant == "token_diffusion":
        modules.append(diffusion)
    if painter is not None:
        modules.append(painter)
    if args.init_encoder is not None:
        setok.encoder.load_state_dict(torch.load(args.init_encoder, weights_only=True))
    for p in setok.parameters():  # the encoder trains (Stage I sub-phase 2)
        p.requires_grad_(True)
    if args.freeze_encoder:
        for p in setok.encoder.parameters():
            p.requires_grad_(False)
    params = list({id(p): p for m in modules for p in m.parameters()}.values())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-3)
    for m in modules:
        m.train()

    step, epoch, t0 = 0, 0, time.perf_counter()
    while step < args.steps:
        for batch in make_loader(
            train_dir, "train", "image", args.batch, shuffle=True, epoch=epoch
        ):
            out = setok(setok.preprocess(batch["pixels"]))
            b, h, w, _ = out.features.shape
            objects, valid = batch["object_masks"].float(), batch["object_valid"]
            grid = resize_masks(objects, (h, w)).flatten(2)
            feats = setok.normalise(out.features.reshape(b, h * w, -1))
            loss = object_grouping_loss(feats, grid, valid)
            terms = {"group": float(loss.detach())}
            if args.variant.startswith("name"):
                from setokim.model.token_content import object_token_iou

                iou = object_token_iou(out.masks, out.token_mask, objects)  # (B, K, O)
                best = iou.argmax(1)  # (B, O)
                pooled = out.tokens.gather(1, best[..., None].expand(-1, -1, out.tokens.shape[-1]))
            else:
                pooled = (
                    grid
                    @ out.features.reshape(b, h * w, -1)
                    / grid.sum(-1, keepdim=True).clamp(min=1e-6)
                )
            if args.variant.startswith(("attr", "name")) or args.attr_weight > 0:
                names = [n + [""] * (valid.shape[1] - len(n)) for n in batch["object_names"]]
                attr = pooled.new_zeros(())
                for i, (key, words) in enumerate(vocab.items()):
                    target = torch.tensor(
                        [
                            [words.index(x.split(" ", 1)[i]) if x else -100 for x in row]
                            for row in names
                        ]
                    )
                    target = target.masked_fill(~valid.bool(), -100)
                    attr = attr + torch.nn.functional.cross_entropy(
                        heads[key](pooled).flatten(0, 1), target.flatten(), ignore_index=-100
                    )
                loss = loss + (args.attr_weight or 1.0) * attr
                terms["attr"] = float(attr.detach())
            if args.variant not in ("group", "attr"):
                logits = mask_decoder(out.tokens, out.token_mask, out.features)
                on = (
                    out.masks
                    if args.variant
                    in ("token_match", "token_diffusion", "attr_token_match", "name_token_match")
                    else None
                )
                ml = mask_loss(
                    logits, out.token_mask, objects, valid, None, kl_weight=0.0, match_on=on
                )
                loss = loss + ml.total
                terms["mask"] = float(ml.total.detach())
            if args.variant == "token_diffusion":
                images = resize_images(batch["pixels"], diffusion.config.image_size)
                d = diffusion.loss(images, out.tokens, out.token_mask)
                loss = loss + d
                terms["diffusion"] = float(d.detach())
            if painter is not None:
                painted, _ = painter(out.tokens, out.token_mask, mask_centroids(out.masks.float()))
                target = resize_images(batch["pixels"], painter.config.image_size)
                paint = torch.nn.functional.mse_loss(painted, target)
                loss = loss + paint
                terms["painter"] = float(paint.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 100 == 0:
                rate = (time.perf_counter() - t0) / step
                print(f"{args.variant} step {step} {terms} {rate:.2f} s/step", flush=True)
            if step >= args.steps:
                break
        epoch += 1
    seconds = (time.perf_counter() - t0) / max(step, 1)
    setok.eval()
    row = probe_row(setok, probe_train, probe_test)
    print(f"{args.variant}: owned {row['owned']:.3f} colour tok/enc {row['token_colour']:.3f}/"
          f"{row['encoder_colour']:.3f} shape tok/enc {row['token_shape']:.3f}/"
          f"{row['encoder_shape']:.3f} (chance {row['chance_shape']:.3f})")  # fmt: skip
    spec = {**vars(args), "world": args.world.as_dict(), "init_encoder": str(args.init_encoder)}
    print(json.dumps({"variant": args.variant, **spec, "s_per_step": seconds, **row}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
