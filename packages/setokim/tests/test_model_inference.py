"""Every inference mode returns the right kind of output from a tiny random SeTokIM; the
KV-cached visual loop equals a full recomputation; batching equals one-by-one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from setokim.model.build import build_tiny_setokim
from setokim.model.chat import Message
from setokim.model.config import SeTokIMConfig
from setokim.model.eval_adapter import SeTokIMAdapter, generation_config
from setokim.model.inference import (
    BoxConstraint,
    GenerationConfig,
    Generator,
    mask_boxes,
    nearest_tokens,
    parse_box,
    segment_masks,
)
from setokim.model.samples import GROUND_PROMPT


@pytest.fixture(scope="module")
def model():
    cfg = SeTokIMConfig(max_visual_tokens=4)
    cfg.tokenizer.clustering.max_clusters = 8
    return build_tiny_setokim(cfg).eval()


def _img(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(seed))


GEN = GenerationConfig(max_new_tokens=6)


def test_understand_text_and_batching(model):
    one = model.understand(_img(0), "what is it?", GEN)
    two = model.understand(_img(1), "describe the shapes", GEN)
    assert isinstance(one, str)
    assert model.understand([_img(0), _img(1)], ["what is it?", "describe the shapes"], GEN) == [
        one,
        two,
    ]
    reply = model.chat(
        [
            Message("user", [_img(0), "hi"]),
            Message("assistant", ["hello"]),
            Message("user", ["more"]),
        ],
        GEN,
    )
    assert isinstance(reply, str)


def test_sampling_is_seeded(model):
    gen = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5, seed=3)
    assert model.understand(_img(0), "what?", gen) == model.understand(_img(0), "what?", gen)


def test_ground_returns_a_box(model):
    box = model.ground(_img(0), "the red circle")
    assert isinstance(box, list) and len(box) == 4 and all(isinstance(v, float) for v in box)
    boxes = model.ground([_img(0), _img(1)], ["the red circle", "the star"])
    assert boxes[0] == box and len(boxes[1]) == 4
    assert parse_box("it is at [ 3, 4,10 , 12] ok") == [3.0, 4.0, 10.0, 12.0]
    assert parse_box("no box") is None


def test_box_text_is_read_from_the_piece_surfaces(model):
    """WordPiece decoding spaces digit pieces apart ("[ 5 2, 9, ..."), which no box regex
    reads: `ground` must rebuild the text from the constrained pieces instead."""
    tok = model.text_tokenizer
    ids = tok("[52,9,62,20]", add_special_tokens=False)["input_ids"]
    gen = Generator(model)
    constraint = BoxConstraint(tok, gen.end_ids)
    assert parse_box(constraint.surface(ids)) == [52.0, 9.0, 62.0, 20.0]
    samples = [gen.prompt_sample([_img(s)], GROUND_PROMPT.format("the star")) for s in (0, 1)]
    texts = gen.generate_text(
        samples,
        GenerationConfig(max_new_tokens=24),
        constraint=constraint,
        decode=constraint.surface,
    )
    assert all(parse_box(t) is not None for t in texts), texts  # never the fallback box


def test_ground_box_lies_inside_the_image(model):
    for seed in range(3):
        x0, y0, x1, y1 = model.ground(_img(seed), "the red circle")
        assert 0 <= x0 <= x1 <= 64 and 0 <= y0 <= y1 <= 64


def test_segment_returns_image_sized_bool_mask(model):
    mask = model.segment(_img(0), "the red circle")
    assert mask.shape == (64, 64) and mask.dtype == torch.bool
    masks = model.segment([_img(0), _img(1)], ["a", "b"])
    assert masks.shape == (2, 64, 64)


def test_generate_and_edit_return_images_in_unit_range(model):
    gen = GenerationConfig(decoder_steps=2, seed=0)
    img = model.generate_image("a red star", gen)
    assert img.shape == (3, 32, 32) and img.min() >= 0 and img.max() <= 1
    batch = model.generate_image(["a red star", "two circles"], gen)
    assert batch.shape == (2, 3, 32, 32)
    edited = model.edit(_img(0), "make it blue", gen)
    assert edited.shape == (3, 32, 32) and edited.min() >= 0 and edited.max() <= 1


def test_cached_visual_loop_equals_full_recompute(model):
    g = Generator(model)
    sample = g.prompt_sample([_img(0)], "draw it", answer_prefix=model.config.img_start)
    vis = g.generate_visual([sample], GenerationConfig(max_visual_tokens=3, min_visual_tokens=3))
    assert vis.tokens.shape == (1, 3, model.token_dim) and vis.token_mask.all()
    packed, _ = model.embed(model.collate([sample]))
    with torch.no_grad():
        seq = torch.cat([packed.inputs_embeds, model.projector(vis.tokens[:, :2])], 1)
        hidden = model.llm.get_decoder()(inputs_embeds=seq).last_hidden_state
        pred = model.regression_head(hidden[:, -3:])
    torch.testing.assert_close(pred, vis.tokens, rtol=1e-4, atol=1e-5)


def test_visual_loop_stops_at_image_end(model):
    g = Generator(model)
    sample = g.prompt_sample([], "draw", answer_prefix=model.config.img_start)
    gen = GenerationConfig(max_visual_tokens=4, min_visual_tokens=2)
    head = model.llm.get_output_embeddings()
    bump = torch.zeros(head.out_features)
    bump[model.ids.img_end] = 1e4  # the LM head now always prefers [/Img]
    handle = head.register_forward_hook(lambda _m, _i, out: out + bump)
    try:
        vis = g.generate_visual([sample], gen)
    finally:
        handle.remove()
    assert vis.tokens.shape[1] == 2 and bool(vis.stopped.all())
    with pytest.raises(ValueError, match="image-start"):
        g.generate_visual([g.prompt_sample([], "draw")], gen)


def _request(tmp_path, task, prompt, doc, generation=None):
    from setok_eval.adapters import Request

    return Request(task, "0", prompt, doc, generation or {})


def test_eval_adapter_protocol(model, tmp_path):
    arr = (np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)
    path = tmp_path / "img.png"
    PILImage.fromarray(arr).save(path)
    adapter = SeTokIMAdapter(model, generation=GenerationConfig(max_new_tokens=4, decoder_steps=2))
    doc = {"image": str(path), "expression": "the red circle", "instruction": "make it blue"}
    text = adapter.understand(
        [_request(tmp_path, "vqa", "what?", doc, {"max_new_tokens": 3, "temperature": 0.0})]
    )
    assert isinstance(text[0], str)
    box = adapter.ground([_request(tmp_path, "rec", "box?", doc)])[0]
    assert len(box) == 4
    mask = adapter.segment([_request(tmp_path, "seg", "seg", doc)])[0]
    assert mask.shape == (48, 40) and mask.dtype == bool
    gen = adapter.generate(
        [_request(tmp_path, "t2i", "a star", {"caption": "a star"}, {"num_inference_steps": 2})]
    )[0]
    assert gen.dtype == np.uint8 and gen.shape == (32, 32, 3)
    edit = adapter.edit([_request(tmp_path, "edit", "x", doc)])[0]
    assert edit.dtype == np.uint8 and edit.ndim == 3
    labels = adapter.tokenize([_request(tmp_path, "tok", "", doc)])[0]
    assert labels.ndim == 2 and labels.min() >= 1
    fp = adapter.fingerprint()
    same = SeTokIMAdapter(model, generation=GenerationConfig(max_new_tokens=4, decoder_steps=2))
    assert fp.startswith("setokim:") and same.fingerprint() == fp
    assert SeTokIMAdapter(model).fingerprint() != fp  # decoding defaults are part of it
    cfg = generation_config({"temperature": 0.7, "num_inference_steps": 9}, GenerationConfig())
    assert cfg.do_sample and cfg.decoder_steps == 9


def test_nearest_tokens_picks_the_closest_valid_token_by_cosine():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        b, k, d = 3, 5, 6
        tokens = torch.randn(b, k, d, generator=gen)
        mask = torch.rand(b, k, generator=gen) > 0.3
        mask[:, 0] = True
        queries = torch.randn(b, d, generator=gen) * 3
        picks = nearest_tokens(tokens, mask, queries)
        for row in range(b):  # the plain loop
            best, best_cos = -1, -2.0
            for j in range(k):
                if mask[row, j]:
                    c = float(torch.dot(tokens[row, j], queries[row]))
                    c /= float(tokens[row, j].norm() * queries[row].norm())
                    if c > best_cos:
                        best, best_cos = j, c
            assert int(picks[row]) == best
    # an invalid token is never picked, even when it is the query itself; length is ignored
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]])
    mask = torch.tensor([[True, True, False]])
    assert int(nearest_tokens(tokens, mask, torch.tensor([[0.6, 0.6]]))[0]) in (0, 1)
    assert int(nearest_tokens(tokens, mask, torch.tensor([[0.01, 0.2]]))[0]) == 1
    with pytest.raises(ValueError, match="valid token"):
        nearest_tokens(tokens, torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 2))


def test_mask_boxes_are_the_tight_boxes_and_an_empty_mask_has_none():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 2:5, 1:7] = True  # rows 2-4, columns 1-6
    assert mask_boxes(masks) == [[1.0, 2.0, 7.0, 5.0], [0.0, 0.0, 0.0, 0.0]]


def test_nearest_token_segment_is_the_picked_tokens_mask(model):
    """segment_from=nearest_token returns the mask the decoder draws for the image token
    nearest the regressed query, among all the image's tokens drawn together."""
    pixels = torch.stack([_img(0), _img(1)])
    enc = model.encode_images(pixels)
    with torch.no_grad():
        every = model.mask_decoder(
            enc.tokens, enc.token_mask, enc.raw.features, output_size=(64, 64)
        )
    for j in range(2):  # a query equal to a valid token picks that token's mask
        j = min(j, int(enc.token_mask[0].sum()) - 1)
        queries = enc.tokens[:, j : j + 1] * 0.5  # length does not matter, direction does
        masks = segment_masks(model, pixels, queries, nearest_token=True)
        assert torch.equal(masks[0], every[0, j] > 0)
    picked = model.segment(
        [_img(0), _img(1)], ["a", "b"], GenerationConfig(segment_from="nearest_token")
    )
    drawn = [{tuple(every[i, k].gt(0).flatten().tolist()) for k in range(every.shape[1])
              if enc.token_mask[i, k]} for i in range(2)]  # fmt: skip
    assert all(tuple(picked[i].flatten().tolist()) in drawn[i] for i in range(2))


def test_ground_from_mask_boxes_the_segment_mask(model):
    gen = GenerationConfig(segment_from="nearest_token", ground_from="mask")
    images, exprs = [_img(0), _img(2)], ["the red circle", "the star"]
    masks = model.segment(images, exprs, gen)
    assert model.ground(images, exprs, gen) == mask_boxes(masks)
    assert model.ground(images[0], exprs[0], gen) == mask_boxes(masks[:1])[0]


def test_unknown_decoding_choices_are_named(model):
    with pytest.raises(ValueError, match="segment_from"):
        SeTokIMConfig(segment_from="nearest")
    with pytest.raises(ValueError, match="ground_from"):
        SeTokIMConfig(ground_from="boxes")
    with pytest.raises(ValueError, match="ground_from"):
        model.ground(_img(0), "the star", GenerationConfig(ground_from="boxes"))


def test_eval_adapter_segments_a_reasonseg_documents_query(model, tmp_path):
    """Stage III trains segmentation on "Segment {query}."; the suite's ReasonSeg prompt
    wraps the query in a question, so the adapter must hand the model the query itself."""
    path = tmp_path / "img.png"
    PILImage.fromarray((_img(3).permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(path)
    adapter = SeTokIMAdapter(model)
    seen = []
    real = model.segment

    def spy(images, expressions, gen=None):
        seen.extend(expressions)
        return real(images, expressions, gen)

    model.segment = spy
    try:
        doc = {"image": str(path), "query": "the object closest to the top"}
        adapter.segment([_request(tmp_path, "reasonseg", "What is it? Output the mask.", doc)])
        adapter.segment([_request(tmp_path, "seg", "the prompt", {"image": str(path)})])
    finally:
        del model.segment
    assert seen == ["the object closest to the top", "the prompt"]
