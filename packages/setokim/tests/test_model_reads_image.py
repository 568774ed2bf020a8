"""A toy SeTokIM must learn from the picture: the answer ("what colour is the shape?") is only in
the image, so no question-only model can push the answer loss below the entropy of the answers.
A few Stage III-style steps (answer-only loss, SeTok frozen) on the smallest SeTokIM the tests
build must go below that floor on held-out images, and lose it again when each image is
swapped for another scene's (the shifted-image control of `setok_eval.controls`)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from setok_eval.controls import derangement
from setokim.model.chat import Message, render
from setokim.model.config import SeTokIMConfig
from setokim.model.losses import next_token_loss
from setokim.model.setokim import SeTokIM

S = 64
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.2, 0.9),
           "yellow": (0.95, 0.9, 0.1)}  # fmt: skip
QUESTION = "What colour is the shape?"


def _scenes(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n grey images, each with one large square (half the side, jittered) of a colour; the
    colours are balanced (n a multiple of 4) so the answers' entropy is exactly ln 4."""
    g = torch.Generator().manual_seed(seed)
    names = [c for _ in range(n // len(COLOURS)) for c in COLOURS]
    order = torch.randperm(n, generator=g).tolist()
    names = [names[i] for i in order]
    pixels = torch.full((n, 3, S, S), 0.5)
    for b, name in enumerate(names):
        x0, y0 = (int(v) for v in torch.randint(0, S // 2, (2,), generator=g))
        pixels[b, :, y0 : y0 + S // 2, x0 : x0 + S // 2] = torch.tensor(COLOURS[name])[
            :, None, None
        ]
    return pixels, names


def _answer_loss(
    model: SeTokIM, pixels: torch.Tensor, answers: list[str]
) -> tuple[torch.Tensor, int]:
    """Mean next-token loss over the answer tokens (and the turn end), as Stage III trains,
    and the number of those tokens."""
    samples = [
        render([Message("user", [img, QUESTION]), Message("assistant", [a])], model.config.chat)
        for img, a in zip(pixels, answers, strict=True)
    ]
    out = model(model.collate(samples))
    return next_token_loss(out.logits, out.packed.labels)


def _blind_floor(answers: list[str], trained_tokens: int) -> float:
    """The lowest mean answer loss any question-only model can reach on these answers: their
    empirical entropy per sample, spread over the trained tokens (every sample asks the same
    question, so the best blind prediction is the answer distribution itself)."""
    counts = Counter(answers)
    entropy = -sum(c / len(answers) * math.log(c / len(answers)) for c in counts.values())
    return entropy * len(answers) / trained_tokens


@pytest.mark.slow
def test_toy_model_learns_the_colour_from_the_image():
    cfg = SeTokIMConfig()
    cfg.tokenizer.clustering.max_clusters = 8
    torch.manual_seed(0)
    model = SeTokIM.from_config(cfg)
    model.train()
    train_px, train_ans = _scenes(32, seed=1)
    test_px, test_ans = _scenes(16, seed=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(3)
    for _ in range(60):
        idx = torch.randperm(32, generator=g)[:16].tolist()
        loss, _ = _answer_loss(model, train_px[idx], [train_ans[i] for i in idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        own, trained = _answer_loss(model, test_px, test_ans)
        perm = torch.as_tensor(derangement(16, seed=0))
        shifted, _ = _answer_loss(model, test_px[perm], test_ans)
    floor = _blind_floor(test_ans, trained)
    own, shifted = float(own), float(shifted)
    print(f"answer loss {own:.3f}, shifted images {shifted:.3f}, blind floor {floor:.3f}")
    assert own < 0.5 * floor, (own, floor)  # below every question-only model, held-out images
    assert shifted > floor, (shifted, floor)  # another scene's picture: worse than blind
