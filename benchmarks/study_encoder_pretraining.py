"""How fast does a tiny encoder learn to name objects? (Stage I's sub-phase 0 on its own)

    uv run python benchmarks/study_encoder_pretraining.py --family convnext --steps 800 \
        [--save runs/enc_convnext.pt]

Trains only the encoder of `study_token_content.py` (ViT patch 4, or ConvNeXt with stem
patch 2 and two stages: both a 16x16 grid at 64 px) with the attribute heads
(`setok_decoders.attributes`) on the upright Shapes World. Then it probes held-out objects
as `probe_tokens.probe_row` does; the merger and clustering are untrained. `--save` writes
the encoder's state dict for `study_token_content.py --init-encoder`. The last line printed
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from probe_tokens import probe_row  # the script's folder is on sys.path
from study_token_content import encoder_overrides, study_data

from setokim.data.shapes_world import World, attribute_labels, attribute_vocab

UPRIGHT = World(shapes=["circle", "triangle", "square", "star"], object_scale=1.6,
                max_rotation=0, max_objects=4)  # fmt: skip


def main() -> int:
    from setok_decoders import AttributeHeads, attribute_loss
    from setok_decoders.attributes import IGNORE
    from setok_tokenizer import SeTok
    from setok_tokenizer.config import ClusteringConfig, EncoderConfig, MergerConfig, SeTokConfig
    from setokim.data import make_loader

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("vit", "convnext"), default="convnext")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--patch", type=int, default=4, help="the grid is 64 / patch")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/study_token_content"))
    parser.add_argument("--save", type=Path, default=None, help="the encoder's state dict")
    args = parser.parse_args()

    train_dir, probe_train, probe_test = study_data(args.out_dir, 64, UPRIGHT)
    torch.manual_seed(0)
    setok = SeTok.from_config(SeTokConfig(
        encoder=EncoderConfig(freeze=False, image_size=64, family=args.family,
                              overrides=encoder_overrides(args)),
        clustering=ClusteringConfig(max_clusters=12, assignment="hard", knn_k=3),
        merger=MergerConfig(num_blocks=1, num_heads=2, relative_pe=True),
    ))  # fmt: skip
    vocab = attribute_vocab(UPRIGHT)
    heads = AttributeHeads(setok.encoder.feature_dim, {k: len(v) for k, v in vocab.items()})
    params = [*setok.encoder.parameters(), *heads.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps,
                                                   pct_start=max(0.05, 2 / args.steps))  # fmt: skip
    setok.train()
    step, epoch, start = 0, 0, time.perf_counter()
    while step < args.steps:
        for batch in make_loader(train_dir, "train", "image", args.batch, shuffle=True,
                                 epoch=epoch):  # fmt: skip
            masks, valid = batch["object_masks"], batch["object_valid"]
            labels = {
                k: torch.from_numpy(v).masked_fill(~valid.bool(), IGNORE)
                for k, v in attribute_labels(batch["object_names"], masks.shape[1], UPRIGHT).items()
            }
            features = setok.encoder(setok.preprocess(batch["pixels"]))
            loss = attribute_loss(heads(features, masks), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            step += 1
            if step % 200 == 0:
                rate = (time.perf_counter() - start) / step
                print(f"step {step} attribute loss {loss.item():.3f} {rate:.2f} s/step", flush=True)
            if step >= args.steps:
                break
        epoch += 1
    seconds = (time.perf_counter() - start) / max(step, 1)
    setok.eval()
    row = probe_row(setok, probe_train, probe_test)
    if args.save is not None:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        torch.save(setok.encoder.state_dict(), args.save)
    spec = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(json.dumps({**spec, "s_per_step": seconds, **row}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
