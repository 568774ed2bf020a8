"""Talk to a SeTokIM checkpoint: understand, ground, segment, generate or edit.

    python tools/chat.py --checkpoint RUN/setokim --image cat.png --prompt "What is this?"
    python tools/chat.py --checkpoint RUN/setokim --mode generate --prompt "a red star" --out star.png
    python tools/chat.py --tiny            # interactive chat with a random tiny model

Interactive mode (no --prompt): type a message; `/image PATH` attaches an image to the next
message, `/reset` clears the conversation, `/quit` leaves.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

MODES = ("understand", "ground", "segment", "generate", "edit")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a SeTokIM.save_pretrained directory")
    src.add_argument(
        "--tiny", action="store_true", help="a random tiny model (for trying the tool)"
    )
    p.add_argument("--mode", choices=MODES, default="understand")
    p.add_argument(
        "--image", type=Path, action="append", default=[], help="input image (repeatable)"
    )
    p.add_argument("--prompt", help="one message; omit for interactive chat")
    p.add_argument("--out", type=Path, help="where to write the image / mask PNG")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decoder-steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--image-size", type=int, default=None, help="resize inputs (default: model's)")
    return p.parse_args(argv)


def load_image(path: Path, size: int):
    """An RGB file → (3,size,size) float tensor in [0,1]."""
    import numpy as np
    import torch
    from PIL import Image

    if not path.is_file():
        raise SystemExit(f"--image {path}: file not found")
    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def save_png(path: Path, array) -> None:
    """Atomic PNG write of an HxW bool mask or a (3,H,W) [0,1] tensor."""
    import numpy as np
    from PIL import Image

    from setokim.utils.io import atomic_write_bytes

    arr = array.detach().cpu().numpy()
    if arr.ndim == 3:
        img = Image.fromarray(
            (np.clip(arr.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
        )
    else:
        img = Image.fromarray(arr.astype(np.uint8) * 255)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def build_model(args: argparse.Namespace):
    from setokim.model.build import build_tiny_setokim
    from setokim.model.setokim import SeTokIM

    if args.tiny:
        print("note: random tiny SeTokIM (no checkpoint): answers are noise", file=sys.stderr)
        return build_tiny_setokim()
    if not args.checkpoint.is_dir():
        raise SystemExit(f"--checkpoint {args.checkpoint}: not a directory")
    return SeTokIM.from_pretrained(args.checkpoint)


def run_once(model, args: argparse.Namespace, images: list, gen) -> str:
    """One request in `args.mode`; returns what to print."""
    if args.mode == "understand":
        return model.understand(images, args.prompt, gen)
    if args.mode == "ground":
        if len(images) != 1:
            raise SystemExit("--mode ground needs exactly one --image")
        box = model.ground(images[0], args.prompt, gen)
        return "[" + ",".join(f"{v:.0f}" for v in box) + "]"
    if args.mode == "generate":
        result = model.generate_image(args.prompt, gen)
    elif args.mode == "edit":
        if len(images) != 1:
            raise SystemExit("--mode edit needs exactly one --image")
        result = model.edit(images[0], args.prompt, gen)
    else:
        if len(images) != 1:
            raise SystemExit("--mode segment needs exactly one --image")
        result = model.segment(images[0], args.prompt, gen)
    if args.out is None:
        raise SystemExit(f"--mode {args.mode} needs --out FILE.png")
    save_png(args.out, result)
    return f"wrote {args.out} ({'x'.join(str(s) for s in result.shape)})"


def interactive(model, args: argparse.Namespace, size: int, gen) -> None:
    from setokim.model.chat import Message

    history: list = []
    pending: list = []
    print("chat: /image PATH, /reset, /quit", file=sys.stderr)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/reset":
            history, pending = [], []
            continue
        if line.startswith("/image "):
            pending.append(load_image(Path(line[7:].strip()), size))
            continue
        history.append(Message("user", [*pending, line]))
        pending = []
        reply = model.chat(history, gen)
        history.append(Message("assistant", [reply]))
        print(reply, flush=True)


def validate(args: argparse.Namespace) -> None:
    """Fail on bad flag combinations before the (slow) model build."""
    if args.mode in ("ground", "segment", "edit") and len(args.image) != 1:
        raise SystemExit(f"--mode {args.mode} needs exactly one --image")
    if args.mode != "understand" and args.prompt is None:
        raise SystemExit(f"--mode {args.mode} needs --prompt")
    if args.mode in ("segment", "generate", "edit") and args.out is None:
        raise SystemExit(f"--mode {args.mode} needs --out FILE.png")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    validate(args)
    from setokim.model.inference import GenerationConfig

    model = build_model(args).eval()
    size = args.image_size or model.config.tokenizer.encoder.image_size
    images = [load_image(p, size) for p in args.image]
    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        decoder_steps=args.decoder_steps,
        guidance_scale=args.guidance_scale,
    )
    if args.prompt is None:
        if args.mode != "understand":
            raise SystemExit(f"--mode {args.mode} needs --prompt")
        interactive(model, args, size, gen)
        return 0
    print(run_once(model, args, images, gen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
