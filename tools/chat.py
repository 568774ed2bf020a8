"""Talk to a SeTokIM checkpoint: understand, ground, segment, generate or edit.

    python tools/chat.py --checkpoint RUN/setokim --image cat.png --prompt "What is this?"
    python tools/chat.py --checkpoint RUN/setokim --mode generate --prompt "a red star" --out star.png
    python tools/chat.py --tiny            # interactive chat with a random tiny model
    python tools/chat.py --checkpoint RUN/setokim --image scene.png --save-panel panel.png

Interactive mode (no --prompt): type a message; `/image PATH` attaches an image to the next
message, `/reset` clears the conversation, `/quit` leaves. A path that is not an image is
reported and the chat goes on.

An empty answer is printed as `(empty answer)` with a note, and an all-black mask is
named as such, so nothing the model returns looks like a tool failure. `--save-panel`
runs every mode on each --image (one row per image: input | answer | box | mask |
generated | edited) and prints how much each output changes from the first row's, so a
model that ignores its image (the same box, mask or picture for every row) shows at once.
Diffusion steps and guidance default to the checkpoint's decoder config.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

MODES = ("understand", "ground", "segment", "generate", "edit")
EMPTY_ANSWER = (
    "(empty answer) note: the model ended its reply at once, before any word "
    "(an untrained model, or a question it was not trained to answer, often does)"
)
EMPTY_MASK = "note: the mask is empty (all black): no pixel's mask logit is above 0"
# The panel's prompts per mode; `--panel-prompt MODE=TEXT` replaces them (repeat it to give
# each row its own prompt: row i takes the i-th, cycling).
PANEL_PROMPTS = {
    "understand": ["Describe the image."],
    "ground": ["the largest shape"],
    "segment": ["the largest shape"],
    "generate": ["a red circle", "a blue square"],
    "edit": ["make the largest shape blue"],
}
PANEL_CELL = 128


class InputError(ValueError):
    """A bad input file (missing, not an image): a message in interactive mode, an exit else."""


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
    p.add_argument(
        "--decoder-steps", type=int, default=None, help="diffusion steps (default: the decoder's)"
    )
    p.add_argument(
        "--guidance-scale", type=float, default=None, help="CFG scale (default: the decoder's)"
    )
    p.add_argument("--image-size", type=int, default=None, help="resize inputs (default: model's)")
    p.add_argument(
        "--save-panel", type=Path, help="every mode on each --image, one PNG row per image"
    )
    p.add_argument(
        "--panel-prompt", action="append", default=[], metavar="MODE=TEXT",
        help="a panel prompt for MODE (repeat: one per row, cycling)",
    )  # fmt: skip
    return p.parse_args(argv)


def show_answer(text: str) -> str:
    """What to print for a text answer: an empty one is named, never a blank line."""
    return text if text.strip() else EMPTY_ANSWER


def load_image(path: Path, size: int):
    """An RGB file → (3,size,size) float tensor in [0,1]; InputError names a bad file."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InputError(f"image {path}: file not found")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"image {path}: not a readable image ({exc})") from exc
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
        return show_answer(model.understand(images, args.prompt, gen))
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
    note = f"\n{EMPTY_MASK}" if args.mode == "segment" and not bool(result.any()) else ""
    return f"wrote {args.out} ({'x'.join(str(s) for s in result.shape)}){note}"


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
        if line == "/image" or line.startswith("/image "):
            path = line[len("/image") :].strip()
            try:
                if not path:
                    raise InputError("/image needs a path: /image PATH")
                pending.append(load_image(Path(path), size))
            except InputError as exc:
                print(f"error: {exc}; the chat goes on", file=sys.stderr, flush=True)
            continue
        history.append(Message("user", [*pending, line]))
        pending = []
        reply = model.chat(history, gen)
        history.append(Message("assistant", [reply]))
        print(show_answer(reply), flush=True)


def panel_prompts(specs: list[str]) -> dict[str, list[str]]:
    """PANEL_PROMPTS with `MODE=TEXT` overrides (all of a mode's prompts replace its defaults)."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        mode, sep, text = spec.partition("=")
        if not sep or mode not in MODES or not text.strip():
            raise SystemExit(f"--panel-prompt {spec!r}: expected MODE=TEXT with MODE in {MODES}")
        out.setdefault(mode, []).append(text)
    return {mode: out.get(mode, PANEL_PROMPTS[mode]) for mode in MODES}


def _cell(image, size: int = PANEL_CELL):
    """(3,H,W) [0,1] tensor or HxWx3 uint8 array → a PIL RGB cell of size x size."""
    import numpy as np
    from PIL import Image

    arr = image if isinstance(image, np.ndarray) else image.detach().cpu().numpy()
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(arr).resize((size, size), Image.NEAREST)


def _text_cell(lines: list[str], size: int = PANEL_CELL):
    """White cell with wrapped text."""
    import textwrap

    from PIL import Image, ImageDraw

    cell = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(cell)
    wrapped = [w for line in lines for w in (textwrap.wrap(line, 20) or [""])]
    draw.multiline_text((3, 3), "\n".join(wrapped[:11]), fill="black", spacing=1)
    return cell


def panel_row(model, image, prompts: dict[str, str], gen) -> dict:
    """Every mode on one image: the outputs and the cells of one panel row."""
    import numpy as np
    from PIL import ImageDraw

    answer = model.understand(image, prompts["understand"], gen)
    box = model.ground(image, prompts["ground"], gen)
    mask = model.segment(image, prompts["segment"], gen).cpu().numpy().astype(bool)
    generated = model.generate_image(prompts["generate"], gen)
    edited = model.edit(image, prompts["edit"], gen)
    h, w = image.shape[-2:]
    scale = PANEL_CELL / w, PANEL_CELL / h
    boxed = _cell(image)
    ImageDraw.Draw(boxed).rectangle(
        [box[0] * scale[0], box[1] * scale[1], box[2] * scale[0], box[3] * scale[1]],
        outline=(255, 0, 0), width=2,
    )  # fmt: skip
    base = (image.detach().cpu().numpy().transpose(1, 2, 0) * 255).astype(np.float64)
    tint = np.where(mask[..., None], 0.5 * base + 0.5 * np.array([255.0, 0, 0]), 0.35 * base)
    cells = [
        _cell(image),
        _text_cell(
            [
                f"Q: {prompts['understand']}",
                f"A: {show_answer(answer)}",
                f"box, mask: {prompts['ground']}"
                if prompts["ground"] == prompts["segment"]
                else f"box: {prompts['ground']}; mask: {prompts['segment']}",
                f"generate: {prompts['generate']}",
                f"edit: {prompts['edit']}",
            ]
        ),  # fmt: skip
        boxed,
        _cell(tint.round().astype(np.uint8)),
        _cell(generated),
        _cell(edited),
    ]
    return {"answer": answer, "box": box, "mask": mask, "generated": generated,
            "edited": edited, "cells": cells}  # fmt: skip


def _iou(a, b) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def _box_iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - ix * iy
    return ix * iy / union if union > 0 else 1.0


def dependence(first: dict, row: dict) -> dict[str, float | bool]:
    """How a row's outputs differ from the first row's (another image, maybe another prompt):
    0 / True everywhere means the model gave the same output for a different input."""
    return {
        "same_answer": first["answer"] == row["answer"],
        "box_iou": _box_iou(first["box"], row["box"]),
        "mask_iou": _iou(first["mask"], row["mask"]),
        "generated_l1": float((first["generated"] - row["generated"]).abs().mean()),
        "edited_l1": float((first["edited"] - row["edited"]).abs().mean()),
    }


def save_panel(model, images: list, paths: list[Path], args: argparse.Namespace, gen) -> str:
    """Write the panel PNG (header + one row per image) and return the report to print."""
    import numpy as np
    from PIL import Image, ImageDraw

    from setok_eval.overlays import save_png as save_rgb

    prompts = panel_prompts(args.panel_prompt)
    rows, report = [], []
    for i, (image, path) in enumerate(zip(images, paths, strict=True)):
        chosen = {mode: texts[i % len(texts)] for mode, texts in prompts.items()}
        row = panel_row(model, image, chosen, gen)
        rows.append(row)
        report.append(f"row {i} {path.name}: answer {show_answer(row['answer'])!r}; "
                      f"box {[round(v) for v in row['box']]}; mask {row['mask'].mean():.3f} "
                      f"of the image; generate {chosen['generate']!r}; edit {chosen['edit']!r}")  # fmt: skip
        if not row["mask"].any():
            report.append(f"  {EMPTY_MASK}")
        if i:
            dep = dependence(rows[0], row)
            report.append("  vs row 0: " + ", ".join(
                f"{k} {v}" if isinstance(v, bool) else f"{k} {v:.3f}" for k, v in dep.items()
            ))  # fmt: skip
    titles = ["input", "answer", "box", "mask", "generated", "edited"]
    header = 14
    panel = Image.new("RGB", (PANEL_CELL * len(titles), header + PANEL_CELL * len(rows)), "white")
    draw = ImageDraw.Draw(panel)
    for j, title in enumerate(titles):
        draw.text((j * PANEL_CELL + 3, 1), title, fill="black")
    for i, row in enumerate(rows):
        for j, cell in enumerate(row["cells"]):
            panel.paste(cell, (j * PANEL_CELL, header + i * PANEL_CELL))
    save_rgb(args.save_panel, np.asarray(panel))
    return "\n".join([*report, f"wrote {args.save_panel} ({len(rows)} rows x 6 panels)"])


def generation_config(args: argparse.Namespace, model):
    """Decoding settings; diffusion steps and guidance default to the checkpoint decoder's own
    (what its Stage I trained and configured), not to a number fixed in this tool."""
    from setokim.model.inference import GenerationConfig

    decoder = getattr(model, "image_decoder", None)
    steps, scale = args.decoder_steps, args.guidance_scale
    if decoder is not None:
        steps = steps if steps is not None else decoder.config.num_inference_steps
        scale = scale if scale is not None else decoder.config.guidance_scale
    fallback = GenerationConfig()
    return GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        decoder_steps=steps if steps is not None else fallback.decoder_steps,
        guidance_scale=scale if scale is not None else fallback.guidance_scale,
    )


def validate(args: argparse.Namespace) -> None:
    """Fail on bad flag combinations before the (slow) model build."""
    if args.save_panel is not None:
        if not args.image:
            raise SystemExit("--save-panel needs at least one --image (one row each)")
        panel_prompts(args.panel_prompt)
        return
    if args.mode in ("ground", "segment", "edit") and len(args.image) != 1:
        raise SystemExit(f"--mode {args.mode} needs exactly one --image")
    if args.mode != "understand" and args.prompt is None:
        raise SystemExit(f"--mode {args.mode} needs --prompt")
    if args.mode in ("segment", "generate", "edit") and args.out is None:
        raise SystemExit(f"--mode {args.mode} needs --out FILE.png")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    validate(args)
    model = build_model(args).eval()
    size = args.image_size or model.config.tokenizer.encoder.image_size
    try:
        images = [load_image(p, size) for p in args.image]
    except InputError as exc:
        raise SystemExit(f"--image: {exc}") from exc
    gen = generation_config(args, model)
    if args.save_panel is not None:
        print(save_panel(model, images, args.image, args, gen))
        return 0
    if args.prompt is None:
        if args.mode != "understand":
            raise SystemExit(f"--mode {args.mode} needs --prompt")
        interactive(model, args, size, gen)
        return 0
    print(run_once(model, args, images, gen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
