#!/usr/bin/env python
"""How much a SeTokIM export's answers depend on the image.

For the first REC documents of an exported Shapes World eval set, the model reads the same
grounding prompt (the first document's expression, answer prefix "[") with each document's
image. Printed: the largest change of the next-token distribution (first box digit) between
images; the change when every visual embedding is replaced by their mean (image information
removed); the mean norm of the visual vs the text input embeddings; and the caption
cross-entropy of the first caption documents with their own images vs with the images
shifted by one (a model that reads the image does worse with the wrong one). A model that
uses the image moves its distribution by far more than a few tenths of a percent.

    uv run python benchmarks/probe_conditioning.py runs/measure_setokim/pipeline/stage3/export \
        runs/measure_setokim/eval_data
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def load_image(path: Path) -> torch.Tensor:
    """An RGB file as (3,H,W) float in [0,1]."""
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1) / 255.0


def caption_loss(model, gen, eval_dir: Path, count: int) -> tuple[float, float]:
    """Caption cross-entropy (second reference) with each document's image, then shifted."""
    from setokim.model.losses import next_token_loss
    from setokim.model.packing import Text

    lines = (eval_dir / "shapes_caption.jsonl").read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line) for line in lines][: max(count, 2)]
    images = [load_image(eval_dir / d["image"]) for d in docs]
    prompt = "Provide a one-sentence caption for the provided image."

    def loss(order: list[int]) -> float:
        samples = []
        for doc, j in zip(docs, order, strict=True):
            sample = gen.prompt_sample([images[j]], prompt)
            sample.segments.append(Text(doc["references"][-1], train=True))
            samples.append(sample)
        with torch.no_grad():
            out = model(model.collate(samples))
            return float(next_token_loss(out.logits, out.packed.labels)[0])

    n = len(docs)
    return loss(list(range(n))), loss([(i + 1) % n for i in range(n)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path, help="a SeTokIM.save_pretrained directory")
    parser.add_argument("eval_data", type=Path, help="export_eval_data root (data/eval/...)")
    parser.add_argument("--images", type=int, default=8, help="REC documents to use")
    args = parser.parse_args()
    from setokim.model.inference import Generator
    from setokim.model.samples import GROUND_PROMPT
    from setokim.model.setokim import SeTokIM

    model = SeTokIM.from_pretrained(args.export).eval()
    gen = Generator(model)
    eval_dir = args.eval_data / "data" / "eval"
    lines = (eval_dir / "shapes_rec.jsonl").read_text(encoding="utf-8").splitlines()
    docs = [json.loads(line) for line in lines][: args.images]
    pixels = [load_image(eval_dir / d["image"]) for d in docs]
    prompt = GROUND_PROMPT.format(docs[0]["expression"])
    samples = [gen.prompt_sample([x], prompt, answer_prefix="[") for x in pixels]
    with torch.no_grad():
        packed, _ = model.embed(model.collate(samples, padding_side="left"))
        embeds, mask = packed.inputs_embeds, packed.attention_mask
        probs = model.llm(inputs_embeds=embeds, attention_mask=mask).logits[:, -1].softmax(-1)
        vb, vp = packed.visual_batch, packed.visual_pos
        mean_visual = embeds.clone()
        mean_visual[vb, vp] = embeds[vb, vp].mean(0)
        ablated = model.llm(inputs_embeds=mean_visual, attention_mask=mask).logits[:, -1]
        text = mask.bool().clone()
        text[vb, vp] = False
    own, shifted = caption_loss(model, gen, eval_dir, args.images)
    between = float((probs - probs[:1]).abs().max())
    removed = float((ablated.softmax(-1) - probs).abs().max())
    visual_norm = float(embeds[vb, vp].norm(dim=-1).mean())
    text_norm = float(embeds[text].norm(dim=-1).mean())
    print(f"largest change of the first-digit distribution between images: {between:.4%}")
    print(f"largest change when the image information is removed:          {removed:.4%}")
    print(f"input embedding norm, visual / text: {visual_norm:.2f} / {text_norm:.3f}")
    print(f"caption cross-entropy, own images / shifted images: {own:.4f} / {shifted:.4f}")
    print(
        json.dumps(
            {
                "bench": "probe_conditioning",
                "export": str(args.export),
                "images": len(docs),
                "max_change_between_images": between,
                "max_change_image_removed": removed,
                "visual_embed_norm": visual_norm,
                "text_embed_norm": text_norm,
                "caption_ce_own_images": own,
                "caption_ce_shifted_images": shifted,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
