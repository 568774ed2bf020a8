"""Toy tasks (documents, images, masks generated locally) and a deterministic toy adapter:
what the runner, scoring and leaderboard are tested on, and a way to try an adapter."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from setok_eval.registry import parse_task


def _png(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path)


def write_toy_suite(root: Path, n: int = 12, seed: int = 0) -> list:
    """Write toy vqa/pope/box/mask/tokens/edit tasks under `root`; returns their TaskSpecs."""
    rng = np.random.default_rng(seed)
    data = root / "data"
    (data / "img").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {k: [] for k in ("vqa", "pope", "box", "mask", "tokens", "edit")}
    for i in range(n):
        img = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        _png(data / "img" / f"{i}.png", img)
        inst = np.zeros((16, 16), dtype=np.uint8)
        inst[: 4 + i % 8, :8] = 1
        inst[8:, 8:] = 2
        _png(data / "img" / f"{i}_inst.png", inst)
        _png(data / "img" / f"{i}_mask.png", (inst == 1).astype(np.uint8) * 255)
        tgt = np.clip(img.astype(int) + 20, 0, 255).astype(np.uint8)
        _png(data / "img" / f"{i}_tgt.png", tgt)
        answer = ["2", "cat", "red"][i % 3]  # VQA ground truth is stored normalised
        rows["vqa"].append(
            {
                "id": f"q{i:03d}",
                "image": f"img/{i}.png",
                "question": f"q {i}?",
                "answers": [answer] * 10,
            }
        )
        rows["pope"].append(
            {
                "id": f"p{i:03d}",
                "image": f"img/{i}.png",
                "question": "Is there a cat?",
                "label": "yes" if i % 2 else "no",
            }
        )
        rows["box"].append(
            {
                "id": f"b{i:03d}",
                "image": f"img/{i}.png",
                "expression": "thing",
                "box": [2, 2, 8, 8],
                "box_format": "xywh",
            }
        )
        rows["mask"].append(
            {
                "id": f"m{i:03d}",
                "image": f"img/{i}.png",
                "expression": "thing",
                "mask": f"img/{i}_mask.png",
            }
        )
        rows["tokens"].append(
            {"id": f"t{i:03d}", "image": f"img/{i}.png", "masks": f"img/{i}_inst.png"}
        )
        rows["edit"].append(
            {
                "id": f"e{i:03d}",
                "image": f"img/{i}.png",
                "instruction": "brighten",
                "target": f"img/{i}_tgt.png",
            }
        )
    specs = []
    defs = {
        "vqa": ("text", "understand", "{question}", ["vqa_accuracy"], "vqa"),
        "pope": ("text", "understand", "{question}", ["pope_f1", "pope_accuracy"], "mllm_bench"),
        "box": ("box", "ground", "{expression}", ["rec_accuracy"], "grounding"),
        "mask": ("mask", "segment", "{expression}", ["giou", "ciou"], "segmentation"),
        "tokens": (
            "tokens",
            "tokenize",
            "",
            [
                {"name": "fg_ari", "metric": "ari", "args": {"ignore_label": 0}},
                "tokens_per_image",
                "mbo",
            ],
            "tokenizer",
        ),
        "edit": ("image", "edit", "{instruction}", ["l1"], "editing"),
    }
    for name, docs in rows.items():
        path = data / f"toy_{name}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        output, method, prompt, metrics, family = defs[name]
        primary = metrics[0] if isinstance(metrics[0], str) else metrics[0]["name"]
        specs.append(
            parse_task(
                {
                    "name": f"toy_{name}",
                    "version": 1,
                    "family": family,
                    "output": output,
                    "method": method,
                    "data": {"path": str(path)},
                    "prompt": prompt,
                    "metrics": metrics,
                    "primary": primary,
                }
            )
        )
    return specs


class ToyAdapter:
    """Deterministic model: `skill` in [0, 1] decides which documents it gets right."""

    def __init__(self, skill: float = 1.0, name: str = "toy", delay: float = 0.0) -> None:
        self.skill, self.name, self.delay = skill, name, delay
        self.calls = 0

    def fingerprint(self) -> str:
        return f"{self.name}-{self.skill}"

    def _good(self, req) -> bool:
        return (int(req.doc_id[1:]) * 0.37) % 1.0 < self.skill

    def _tick(self, n: int) -> None:
        self.calls += n
        if self.delay:
            time.sleep(self.delay * n)

    def understand(self, reqs):
        self._tick(len(reqs))
        out = []
        for r in reqs:
            if "answers" in r.doc:
                answer = r.doc["answers"][0]
                out.append(
                    {"2": "Two."}.get(answer, answer.upper() + ".") if self._good(r) else "blue"
                )
            else:
                yes = (r.doc["label"] == "yes") == self._good(r)
                out.append("Yes, there is." if yes else "No, there is not.")
        return out

    def ground(self, reqs):
        self._tick(len(reqs))
        return [[2, 2, 10, 10] if self._good(r) else [12, 12, 15, 15] for r in reqs]

    def segment(self, reqs):
        self._tick(len(reqs))
        out = []
        for r in reqs:
            m = np.asarray(Image.open(r.doc["mask"])) > 0
            out.append(m if self._good(r) else np.roll(m, 5, axis=1))
        return out

    def tokenize(self, reqs):
        self._tick(len(reqs))
        out = []
        for r in reqs:
            gt = np.asarray(Image.open(r.doc["masks"])).astype(np.int64)
            out.append(gt[::2, ::2] if self._good(r) else np.arange(64).reshape(8, 8) // 20)
        return out

    def edit(self, reqs):
        self._tick(len(reqs))
        out = []
        for r in reqs:
            img = r.load_image().astype(int)
            out.append(np.clip(img + (20 if self._good(r) else 60), 0, 255).astype(np.uint8))
        return out
