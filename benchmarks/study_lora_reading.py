#!/usr/bin/env python
"""Why does the tiny SeTokIM not read tokens that a small reader reads? A bisection on the
VQA questions of a Shapes World folder over a Stage I export's frozen tokens (CPU).

The tiny Llama of `+exp=setokim_shapes` (2 layers, width 128, from a seed) reads
[projected tokens][question words] causally and answers from its last position, trained in
one of these ways (variants run one after the other, same data, same seed):

    full       every weight trains (AdamW, lr 3e-4)
    lora5e-3   LoRA r=8 on q/k/v/o + projector + answer head at Stage III's old lr 5e-3
    lora1e-3   the same at lr 1e-3
    full_pad   `full` with 60 filler tokens between image and question (the long prompt)

Exact-match accuracy on the test split every 500 steps, with the same model given another
question's tokens (shifted). The tokens are those of `setokim.model.token_reader`;
`--geometry on` (or `both`) gives each token also where its cluster lies (centre, box and
size, `setok_tokenizer.geometry`), as SeTokIM's `visual_geometry` does.

    uv run python benchmarks/study_lora_reading.py --export runs/s1cnx_export \
        --shards runs/m13w/data/shapes_world_setokim [--variants full lora5e-3 lora1e-3] \
        [--geometry off|on|both]
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from setokim.model.token_reader import VQAExamples, collect_vqa_examples, words

VARIANTS = ("full", "lora5e-3", "lora1e-3", "full_pad")


class LlamaReader(nn.Module):
    """The tiny Llama over [projected tokens][filler][question words], answer from the end."""

    def __init__(self, token_dim: int, vocab: int, answers: int, filler: int) -> None:
        from transformers import LlamaConfig, LlamaModel

        super().__init__()
        cfg = LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, intermediate_size=256, vocab_size=vocab,
                          max_position_embeddings=512)  # fmt: skip
        self.llm = LlamaModel(cfg)
        self.project = nn.Sequential(nn.Linear(token_dim, 128), nn.GELU(), nn.Linear(128, 128))
        self.head = nn.Linear(128, answers)
        self.filler = filler

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, qids: torch.Tensor) -> torch.Tensor:
        b = qids.shape[0]
        filler = torch.ones(b, self.filler, dtype=torch.long)
        x = torch.cat([self.project(tokens), self.llm.embed_tokens(filler),
                       self.llm.embed_tokens(qids)], 1)  # fmt: skip
        keep = torch.cat([mask, torch.ones(b, self.filler + qids.shape[1], dtype=torch.bool)], 1)
        return self.head(
            self.llm(inputs_embeds=x, attention_mask=keep.long()).last_hidden_state[:, -1]
        )


def question_ids(questions: list[str], vocab: dict[str, int]) -> torch.Tensor:
    """Left-padded word ids (pad 0, unknown 1), so every question ends at the last position."""
    ids = [[vocab.get(w, 1) for w in words(q)] for q in questions]
    out = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for row, seq in enumerate(ids):
        out[row, out.shape[1] - len(seq) :] = torch.tensor(seq)
    return out


def run(
    variant: str, train: VQAExamples, test: VQAExamples, steps: int, batch: int, label: str
) -> None:
    torch.manual_seed(0)
    vocab = {w: i + 2 for i, w in enumerate(sorted({w for q in train.questions for w in words(q)}))}
    answers = sorted(set(train.answers))
    model = LlamaReader(train.tokens.shape[-1], len(vocab) + 2, len(answers),
                        filler=60 if variant == "full_pad" else 0)  # fmt: skip
    lr = {"lora5e-3": 5e-3, "lora1e-3": 1e-3}.get(variant, 3e-4)
    if variant.startswith("lora"):
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        )
        inject_adapter_in_model(lora, model.llm)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name or name.startswith(("project", "head")))
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr, weight_decay=1e-3
    )
    qids, test_qids = question_ids(train.questions, vocab), question_ids(test.questions, vocab)
    target = torch.tensor([answers.index(a) for a in train.answers])
    shifted = torch.roll(torch.arange(len(test.answers)), 7)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        i = torch.randint(0, len(target), (batch,))
        loss = F.cross_entropy(model(train.tokens[i], train.token_mask[i], qids[i]), target[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 500 and step != steps:
            continue
        model.eval()
        with torch.no_grad():
            scores = {}
            for name, rows in (("own", torch.arange(len(shifted))), ("shifted", shifted)):
                pred = model(test.tokens[rows], test.token_mask[rows], test_qids).argmax(-1)
                hit = collections.defaultdict(list)
                for p, a, t in zip(pred.tolist(), test.answers, test.question_types, strict=True):
                    hit[t].append(answers[p] == a)
                    hit["all"].append(answers[p] == a)
                scores[name] = {k: round(sum(v) / len(v), 3) for k, v in sorted(hit.items())}
        model.train()
        print(f"{label:13s} step {step:5d} samples {step * batch:6d} own {scores['own']['all']:.3f} "
              f"shifted {scores['shifted']['all']:.3f} ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    print(f"{label:13s} by type: own {scores['own']}\n{'':13s} shifted {scores['shifted']}")


def main() -> None:
    from setok_tokenizer import SeTok

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--export", type=Path, required=True, help="a Stage I export")
    parser.add_argument("--shards", type=Path, required=True, help="a Shapes World folder")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--geometry", choices=("off", "on", "both"), default="off")
    args = parser.parse_args()
    torch.set_num_threads(1)
    setok = SeTok.from_pretrained(args.export / "tokenizer").eval()
    for geometry in {"off": [False], "on": [True], "both": [False, True]}[args.geometry]:
        train = collect_vqa_examples(setok, args.shards, "train", 16, geometry=geometry)
        test = collect_vqa_examples(setok, args.shards, "test", 16, 16, geometry=geometry)
        print(f"questions: train {len(train.answers)}, test {len(test.answers)}")
        for variant in args.variants:
            label = f"{variant}+geo" if geometry else variant
            run(variant, train, test, args.steps, args.batch_size, label)


if __name__ == "__main__":
    main()
