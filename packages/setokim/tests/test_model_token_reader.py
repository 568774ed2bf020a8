"""The token reader (the simple baseline model): it finds an answer planted in one of the
image's tokens, it cannot answer from another image's tokens, and it answers eval-suite
requests from real Shapes World images through a SeTok."""

from __future__ import annotations

import json

import pytest
import torch

from setokim.model.token_reader import (
    TokenReaderAdapter,
    TokenReaderConfig,
    VQAExamples,
    collect_vqa_examples,
    fit_token_reader,
    pad_tokens,
)

COLOURS = ["red", "green", "blue", "yellow"]
CFG = TokenReaderConfig(width=32, layers=2, heads=2, steps=400, batch_size=32, lr=2e-3,
                        max_tokens=4)  # fmt: skip


def planted(n: int, seed: int) -> VQAExamples:
    """Colour questions whose answer is a one-hot in one random token among noise tokens."""
    gen = torch.Generator().manual_seed(seed)
    colour = torch.randint(0, len(COLOURS), (n,), generator=gen)
    tokens = torch.randn(n, 4, 8, generator=gen) * 0.3
    slot = torch.randint(0, 3, (n,), generator=gen)
    tokens[torch.arange(n), slot, colour] += 3.0
    mask = torch.ones(n, 4, dtype=torch.bool)
    mask[:, 3] = False  # a padded slot, never read
    answers = [COLOURS[c] for c in colour.tolist()]
    return VQAExamples(tokens, mask, ["What color is the shape?"] * n, answers, ["color"] * n)


def accuracy(predicted: list[str], truth: list[str]) -> float:
    return sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)


def test_the_reader_finds_a_planted_answer_and_not_another_images() -> None:
    reader = fit_token_reader(planted(512, seed=0), CFG)
    test = planted(256, seed=1)
    own = accuracy(reader.answer(test.tokens, test.token_mask, test.questions), test.answers)
    shifted = torch.roll(torch.arange(256), 1)
    other = reader.answer(test.tokens[shifted], test.token_mask[shifted], test.questions)
    majority = max(test.answers.count(c) for c in COLOURS) / 256
    assert own > 0.9, own
    assert accuracy(other, test.answers) < majority + 0.15


def test_pad_tokens_cuts_and_pads() -> None:
    tokens, mask = torch.ones(2, 3, 5), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    cut, cut_mask = pad_tokens(tokens, mask, 2)
    padded, padded_mask = pad_tokens(tokens, mask, 4)
    assert cut.shape == (2, 2, 5) and cut_mask.all()
    assert padded.shape == (2, 4, 5) and padded_mask.tolist() == [
        [True, True, False, False], [True, True, True, False]]  # fmt: skip
    assert padded[:, 3].abs().sum() == 0


@pytest.mark.parametrize("geometry", [False, True])
def test_the_adapter_answers_suite_requests_from_shapes_world(tmp_path, geometry) -> None:
    from setok_eval.adapters import Request
    from setok_tokenizer import SeTok
    from setok_tokenizer.geometry import fourier_width
    from setokim.data import generate_dataset
    from setokim.data.eval_export import export_eval_data
    from setokim.stages.common import tiny_tokenizer

    shards = tmp_path / "sw"
    generate_dataset(shards, train=6, val=0, test=4, image_size=32, seed=0)
    setok = SeTok.from_config(tiny_tokenizer()).eval()
    cfg = TokenReaderConfig(width=16, layers=1, heads=2, steps=5, batch_size=8, max_tokens=8,
                            geometry=geometry)  # fmt: skip
    examples = collect_vqa_examples(setok, shards, "train", cfg.max_tokens, 4, geometry)
    assert len(examples.questions) > 6  # every question of every image, not one per image
    extra = fourier_width() if geometry else 0
    plain = collect_vqa_examples(setok, shards, "train", cfg.max_tokens, 4).tokens
    assert examples.tokens.shape == (len(examples.questions), 8, plain.shape[-1] + extra)
    torch.testing.assert_close(examples.tokens[..., : plain.shape[-1]], plain)
    reader = fit_token_reader(examples, cfg)
    vqa = export_eval_data(shards, "test", tmp_path / "eval")["shapes_vqa"]
    docs = [json.loads(line) for line in vqa.read_text().splitlines()]
    requests = [
        Request(
            "shapes_vqa",
            d["id"],
            d["question"] + "\nAnswer briefly.",
            {**d, "image": str(vqa.parent / d["image"])},
        )  # fmt: skip
        for d in docs
    ]
    adapter = TokenReaderAdapter(reader, setok, image_size=32, batch_size=3)
    answers = adapter.understand(requests)
    assert len(answers) == len(requests)
    assert set(answers) <= set(examples.answers)
    assert adapter.fingerprint() == TokenReaderAdapter(reader, setok, 32).fingerprint()
