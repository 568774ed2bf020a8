"""The chat template and Stage III's answer-only labels; Stage II/III sample formats."""

from __future__ import annotations

import pytest
import torch

from setokim.model.chat import Message, render
from setokim.model.config import ChatTemplateConfig, vicuna_chat_template
from setokim.model.packing import IGNORE_INDEX, Image, collate_sequences, pack
from setokim.model.samples import batch_to_samples, format_box
from setokim.model.text_tokenizer import add_special_tokens, build_text_tokenizer, token_id

TEMPLATE = ChatTemplateConfig()


@pytest.fixture(scope="module")
def tok():
    t = build_text_tokenizer()
    add_special_tokens(t, ["[Img]", "[/Img]", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"])
    return t


def _labels(samples, tok, ids, n_visual=3):
    layout = collate_sequences(samples, tok, ids)
    I = layout.num_images  # noqa: E741
    packed = pack(
        layout,
        torch.zeros(*layout.text_ids.shape, 4),
        torch.zeros(I, n_visual, 4),
        torch.ones(I, n_visual, dtype=torch.bool),
    )
    return packed


def _decoded_targets(packed, tok, b):
    lab = packed.labels[b]
    return tok.decode(lab[lab != IGNORE_INDEX].tolist(), skip_special_tokens=False)


def test_answer_only_labels_multi_turn(tok, ids):
    img = torch.rand(3, 16, 16)
    msgs = [
        Message("user", [img, "what color is the circle?"]),
        Message("assistant", ["red"]),
        Message("user", ["and the square?"]),
        Message("assistant", ["blue"]),
    ]
    packed = _labels([render(msgs, TEMPLATE)], tok, ids)
    assert _decoded_targets(packed, tok, 0) == "red <|end|> blue <|end|>"
    text = tok.decode(packed.token_ids[0][packed.attention_mask[0].bool()].tolist())
    assert "what color is the circle?" in text and "<|user|>" in text


def test_generation_prompt_has_no_targets_and_ends_with_assistant(tok, ids):
    sample = render([Message("user", ["hi"])], TEMPLATE, add_generation_prompt=True)
    packed = _labels([sample], tok, ids)
    assert (packed.labels == IGNORE_INDEX).all()
    last = packed.token_ids[0, int(packed.seq_len[0]) - 1]
    assert int(last) == token_id(tok, "<|assistant|>")


def test_assistant_image_is_an_output(tok, ids):
    img = torch.rand(3, 16, 16)
    sample = render([Message("user", ["draw a star"]), Message("assistant", [img])], TEMPLATE)
    assert [s for s in sample.segments if isinstance(s, Image)] == [Image(0, output=True)]
    packed = _labels([sample], tok, ids)
    assert _decoded_targets(packed, tok, 0) == "[Img] [/Img] <|end|>"
    assert packed.visual_output.all() and packed.visual_output.numel() == 3


def test_prompt_before_images_moves_user_text_only():
    first, second, out = torch.rand(3, 16, 16), torch.zeros(3, 16, 16), torch.ones(3, 16, 16)
    msgs = [
        Message("user", [first, "then", second, "make it blue"]),
        Message("assistant", ["done", out]),
    ]
    template = ChatTemplateConfig(prompt_before_images=True)
    moved, plain = render(msgs, template), render(msgs, TEMPLATE)
    kinds = [s.text.strip() if not isinstance(s, Image) else s for s in moved.segments]
    user = kinds[kinds.index("<|user|>") + 1 : kinds.index("<|assistant|>")]
    assert user == ["then", "make it blue", Image(0), Image(1), ""]
    assert kinds[kinds.index("<|assistant|>") + 1 :][:2] == ["done", Image(2, output=True)]
    # the same images in the same order: only where the user's text sits changes
    assert torch.equal(moved.images, plain.images)
    plain_kinds = [s.text.strip() if not isinstance(s, Image) else s for s in plain.segments]
    assert plain_kinds[plain_kinds.index("<|user|>") + 1] == Image(0)


def test_render_rejects_bad_roles_and_images():
    with pytest.raises(ValueError, match=r"messages\[0\]\.role"):
        render([Message("bot", ["x"])], TEMPLATE)
    with pytest.raises(ValueError, match=r"messages\[0\] has an image"):
        render([Message("user", [torch.rand(1, 4, 4)])], TEMPLATE)


def test_vicuna_template_renders_plain_roles():
    text = render([Message("user", ["hi"])], vicuna_chat_template(), add_generation_prompt=True)
    joined = "".join(s.text for s in text.segments)
    assert "USER: hi" in joined and joined.rstrip().endswith("ASSISTANT:")


def _batch(task, **fields):
    b = {"task": task, "key": ["k0", "k1"], "pixels": torch.rand(2, 3, 16, 16)}
    b.update(fields)
    return b


def test_batch_to_samples_formats(tok, ids):
    rec = _batch(
        "rec",
        expressions=["the red circle", "the blue star"],
        target_boxes=torch.tensor([[1.0, 2.0, 10.4, 12.6], [0.0, 0.0, 5.0, 5.0]]),
    )
    packed = _labels(batch_to_samples(rec, "instruct", TEMPLATE), tok, ids)
    assert _decoded_targets(packed, tok, 0).replace(" ", "") == "[1,2,10,13]<|end|>"
    edit = _batch(
        "edit", instructions=["make it red", "remove it"], target_pixels=torch.rand(2, 3, 16, 16)
    )
    samples = batch_to_samples(edit, "pretrain", TEMPLATE)
    assert samples[0].images.shape == (2, 3, 16, 16)
    assert torch.equal(samples[1].images[1], edit["target_pixels"][1])
    t2i = batch_to_samples(_batch("t2i", captions=["a star", "a circle"]), "pretrain", TEMPLATE)
    packed = _labels(t2i, tok, ids)
    assert _decoded_targets(packed, tok, 1) == "[Img] [/Img]"
    chat = _batch(
        "chat",
        conversations=[
            [
                {"from": "human", "value": "<image>\nwhat is it?"},
                {"from": "gpt", "value": "a star"},
            ],
            [{"from": "human", "value": "count them"}, {"from": "gpt", "value": "two"}],
        ],
    )
    packed = _labels(batch_to_samples(chat, "instruct", TEMPLATE), tok, ids)
    assert _decoded_targets(packed, tok, 1) == "two <|end|>"
    with pytest.raises(ValueError, match="mode"):
        batch_to_samples(chat, "finetune", TEMPLATE)
    assert format_box([0.4, 1.6, 2, 3]) == "[0,2,2,3]"
