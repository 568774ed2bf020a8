"""Packing interleaved text/image sequences: positions, masks and labels against a plain
per-token reference built with Python loops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from setokim.model.packing import (
    IGNORE_INDEX,
    Image,
    Sample,
    SpecialIds,
    Text,
    collate_sequences,
    pack,
)
from setokim.model.text_tokenizer import add_special_tokens, build_text_tokenizer, token_id

H = 8


@pytest.fixture(scope="module")
def tok():
    t = build_text_tokenizer()
    add_special_tokens(t, ["[Img]", "[/Img]"])
    return t


def _images(n: int) -> torch.Tensor | None:
    return torch.rand(n, 3, 16, 16) if n else None


def _samples() -> list[Sample]:
    """0, 1 and 3 images; the 3-image sample mixes input and output images."""
    return [
        Sample([Text("what is a circle?"), Text(" a round shape", train=True)]),
        Sample([Text("describe"), Image(0), Text("a red square", train=True)], _images(1)),
        Sample(
            [
                Text("one"),
                Image(0),
                Text("two", train=True),
                Image(1),
                Image(2, output=True),
                Text("end", train=True),
            ],
            _images(3),
        ),
    ]


def _reference(layout, text_embeds, visual_embeds, visual_mask):
    """Per sample: the list of (embedding, label, is_visual) in order, by plain loops."""
    seqs = []
    for b in range(layout.batch_size):
        items = []
        n_text = int(layout.text_len[b])
        images_here = [i for i in range(layout.num_images) if int(layout.image_sample[i]) == b]
        for j in range(n_text + 1):
            for i in images_here:
                if int(layout.image_after[i]) == j:
                    for k in range(visual_mask.shape[1]):
                        if visual_mask[i, k]:
                            items.append((visual_embeds[i, k], IGNORE_INDEX, True, i))
            if j < n_text:
                tid = int(layout.text_ids[b, j])
                label = tid if bool(layout.text_train[b, j]) else IGNORE_INDEX
                items.append((text_embeds[b, j], label, False, -1))
        seqs.append(items)
    return seqs


def _check(layout, text_embeds, visual_embeds, visual_mask, side):
    packed = pack(layout, text_embeds, visual_embeds, visual_mask, pad_id=0)
    ref = _reference(layout, text_embeds, visual_embeds, visual_mask)
    B, T, _ = packed.inputs_embeds.shape
    assert T == max(len(r) for r in ref)
    n_vis = 0
    for b, items in enumerate(ref):
        n = len(items)
        assert int(packed.seq_len[b]) == n
        start = T - n if side == "left" else 0
        real = torch.zeros(T, dtype=torch.long)
        real[start : start + n] = 1
        assert torch.equal(packed.attention_mask[b], real)
        assert torch.equal(packed.position_ids[b, start : start + n], torch.arange(n))
        for t, (emb, label, _, _) in enumerate(items):
            assert torch.equal(packed.inputs_embeds[b, start + t], emb)
            assert int(packed.labels[b, start + t]) == label
        pad = real == 0
        assert (packed.labels[b][pad] == IGNORE_INDEX).all()
        assert (packed.inputs_embeds[b][pad] == 0).all()
        n_vis += sum(1 for it in items if it[2])
    # visual index tensors point at the visual positions, labels there are ignored
    assert packed.visual_pos.numel() == n_vis == int(visual_mask.sum())
    assert (packed.labels[packed.visual_batch, packed.visual_pos] == IGNORE_INDEX).all()
    flat = visual_embeds[visual_mask]
    assert torch.equal(packed.inputs_embeds[packed.visual_batch, packed.visual_pos], flat)
    return packed


@pytest.mark.parametrize("side", ["right", "left"])
def test_pack_zero_one_three_images(tok, ids, side):
    layout = collate_sequences(_samples(), tok, ids, padding_side=side)
    assert layout.num_images == 4
    assert layout.image_sample.tolist() == [1, 2, 2, 2]
    assert layout.image_output.tolist() == [False, False, False, True]
    # different token counts per image, including a non-prefix validity pattern
    visual_mask = torch.tensor(
        [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.bool
    )
    g = torch.Generator().manual_seed(0)
    text_embeds = torch.randn(*layout.text_ids.shape, H, generator=g)
    visual_embeds = torch.randn(4, 5, H, generator=g)
    packed = _check(layout, text_embeds, visual_embeds, visual_mask, side)
    # the output image's [Img] and [/Img] are labels, the input images' are not
    img_start = packed.token_ids == ids.img_start
    labelled = packed.labels == ids.img_start
    assert int(img_start.sum()) == 4 and int(labelled.sum()) == 1
    assert int((packed.labels == ids.img_end).sum()) == 1
    assert packed.visual_output.sum() == 4  # the 4 tokens of the output image
    # sample 0 has no images: its sequence is exactly its text
    assert int(packed.seq_len[0]) == int(layout.text_len[0])


def test_pack_without_images(tok, ids):
    samples = [Sample([Text("a b c", train=True)]), Sample([Text("d")])]
    layout = collate_sequences(samples, tok, ids)
    assert layout.pixels is None and layout.num_images == 0
    text_embeds = torch.randn(*layout.text_ids.shape, H)
    packed = _check(
        layout, text_embeds, torch.zeros(0, 1, H), torch.zeros(0, 1, dtype=torch.bool), "right"
    )
    assert packed.visual_pos.numel() == 0


def test_pack_gradients_flow_to_both_sources(tok, ids):
    layout = collate_sequences(_samples(), tok, ids)
    text_embeds = torch.randn(*layout.text_ids.shape, H, requires_grad=True)
    visual_embeds = torch.randn(4, 3, H, requires_grad=True)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[0, 2] = False
    packed = pack(layout, text_embeds, visual_embeds, mask)
    packed.inputs_embeds.sum().backward()
    assert torch.equal(visual_embeds.grad[..., 0], mask.float())
    valid = torch.arange(layout.text_ids.shape[1])[None] < layout.text_len[:, None]
    assert torch.equal(text_embeds.grad[..., 0], valid.float())


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.lists(st.integers(1, 4), max_size=3), min_size=1, max_size=3),
    side=st.sampled_from(["left", "right"]),
    seed=st.integers(0, 1000),
)
def test_pack_matches_reference_random(counts, side, seed):
    tok = build_text_tokenizer()
    add_special_tokens(tok, ["[Img]", "[/Img]"])
    ids = SpecialIds(
        token_id(tok, "[Img]"), token_id(tok, "[/Img]"), tok.pad_token_id, tok.bos_token_id
    )
    samples = []
    for b, per in enumerate(counts):
        segs = [Text(f"sample {b}")]
        for i in range(len(per)):
            segs += [Image(i, output=bool((seed + i) % 2)), Text("and", train=True)]
        samples.append(Sample(segs, _images(len(per))))
    layout = collate_sequences(samples, tok, ids, padding_side=side)
    flat = [c for per in counts for c in per]
    K = max(flat, default=1)
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(flat), K, dtype=torch.bool)
    for i, c in enumerate(flat):
        mask[i, torch.randperm(K, generator=g)[:c]] = True
    _check(
        layout,
        torch.randn(*layout.text_ids.shape, H, generator=g),
        torch.randn(len(flat), K, H, generator=g),
        mask,
        side,
    )


def test_collate_errors_name_the_sample(tok, ids):
    with pytest.raises(ValueError, match=r"samples\[1\] refers to image 2"):
        collate_sequences([Sample([Text("a")]), Sample([Image(2)], _images(1))], tok, ids)
    with pytest.raises(ValueError, match="padding_side"):
        collate_sequences([Sample([Text("a")])], tok, ids, padding_side="middle")
    bad = Sample([Image(0)], torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"samples\[0\]\.images"):
        collate_sequences([bad], tok, ids)


def _segmentation(key: str = "seg") -> Sample:
    """Input image, prompt, then the region mask in the output slot (`region_images`)."""
    return Sample([Image(0), Text(" segment it "), Image(1, output=True)], _images(2), key, (1,))


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 0, 1], [1, 3, 0, 2]])
def test_region_flag_marks_exactly_the_region_images(tok, ids, order):
    samples = _samples() + [_segmentation()]
    samples = [samples[i] for i in order]
    layout = collate_sequences(samples, tok, ids)
    expected = []  # per layout image, in sample order then appearance order
    for s in samples:
        for seg in s.segments:
            if isinstance(seg, Image):
                expected.append(seg.index in s.region_images)
    assert layout.image_is_region.tolist() == expected
    assert sum(expected) == 1
    region = int(layout.image_is_region.nonzero()[0, 0])
    assert int(layout.image_sample[region]) == order.index(3)
    assert bool(layout.image_output[region])
    # the flag survives a device move, and hand-built layouts default to "no regions"
    assert torch.equal(layout.to("cpu").image_is_region, layout.image_is_region)
    plain = collate_sequences(_samples(), tok, ids)
    assert plain.image_is_region.tolist() == [False] * plain.num_images


def test_region_images_errors_name_the_sample(tok, ids):
    ok = Sample([Text("a")])
    cases = [
        (Sample([Image(0), Image(1, output=True)], _images(2), region_images=(2,)), "holds 2"),
        (Sample([Image(0), Image(1)], _images(2), region_images=(1,)), "used as an input"),
        (Sample([Image(1, output=True), Image(0)], _images(2), region_images=(1,)), "comes first"),
        (Sample([Image(0)], _images(2), region_images=(1,)), "not placed"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=rf"samples\[1\].*{message}"):
            collate_sequences([ok, bad], tok, ids)


def test_long_samples_are_cut_at_max_text_tokens_dropping_cut_images(tok, ids, caplog):
    long_text = " ".join(["red circle"] * 20)
    samples = [
        Sample([Text("short"), Image(0), Text("ok", train=True)], _images(1), key="short"),
        Sample(
            [Text("look"), Image(0), Text(long_text, train=True), Image(1), Text("end")],
            _images(2),
            key="long",
        ),
    ]
    full = collate_sequences(samples, tok, ids)
    closing = int(full.image_after[2])  # index of the long sample's second [/Img]
    cap = closing  # keeps that image's [Img] (at cap - 1) but not its [/Img]
    with caplog.at_level("WARNING", logger="setokim.packing"):
        cut = collate_sequences(samples, tok, ids, max_text_tokens=cap)
    assert "'long'" in caplog.text and f"cut to {cap - 1}" in caplog.text
    assert int(cut.text_len[0]) == int(full.text_len[0])  # under the cap: unchanged
    assert torch.equal(cut.text_ids[0], full.text_ids[0][: cut.text_ids.shape[1]])
    # the long sample keeps its first image and the text before the dropped image's [Img]
    assert int(cut.text_len[1]) == cap - 1
    assert cut.num_images == 2 and cut.image_sample.tolist() == [0, 1]
    assert cut.pixels is not None and torch.equal(cut.pixels[1], samples[1].images[0])
    assert int((cut.text_ids[1] == ids.img_start).sum()) == 1
    kept = full.text_ids[1, : cap - 1]
    assert torch.equal(cut.text_ids[1, : cap - 1], kept)
    # a cap inside the first image's span drops every image (both samples are cut here)
    tiny = collate_sequences(samples, tok, ids, max_text_tokens=3)
    assert tiny.num_images == 0 and tiny.pixels is None
    assert max(tiny.text_len.tolist()) <= 3
    assert not bool((tiny.text_ids == ids.img_start).any())  # no [Img] left dangling
