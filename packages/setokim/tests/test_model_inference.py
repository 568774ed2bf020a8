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
from setokim.model.inference import BoxConstraint, GenerationConfig, Generator, parse_box
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
