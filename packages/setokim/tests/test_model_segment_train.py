"""Training for `SeTokIM.segment`: rec/reasonseg batches yield a segmentation sample whose output
slot regresses the frozen SeTok region embedding that inference feeds the mask decoder."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from setokim.model.config import SeTokIMConfig
from setokim.model.losses import embedding_regression_loss, region_embeddings, stage_loss
from setokim.model.packing import Image, Sample, Text
from setokim.model.samples import REGION_KEY_SUFFIX, batch_to_samples
from setokim.model.setokim import SeTokIM

S = 64


@pytest.fixture(scope="module")
def base() -> SeTokIM:
    cfg = SeTokIMConfig()
    cfg.tokenizer.clustering.max_clusters = 8
    return SeTokIM.from_config(cfg)


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


def _cluster_regions(model: SeTokIM, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard cluster map of `image` upsampled to pixels (S,S), and its valid token ids."""
    out = model.vision_tokenizer(model.preprocess(image[None]))
    masks = out.masks[0].masked_fill(~out.token_mask[0, :, None, None], -1.0)
    hard = masks.argmax(0).float()[None, None]
    return F.interpolate(hard, size=(S, S), mode="nearest")[0, 0].long(), out.tokens[0]


def _rec_batch(model: SeTokIM, pixels: torch.Tensor) -> tuple[dict, list[int]]:
    """Each item's target mask is one whole SeTok cluster (a different one per item)."""
    masks, picked = [], []
    for b in range(pixels.shape[0]):
        regions, _ = _cluster_regions(model, pixels[b])
        ids, counts = regions.unique(return_counts=True)
        j = int(ids[counts.argsort(descending=True)[b % len(ids)]])
        masks.append(regions == j)
        picked.append(j)
    batch = {
        "task": "rec",
        "key": [f"k{b}" for b in range(pixels.shape[0])],
        "pixels": pixels,
        "expressions": [f"object {b}" for b in range(pixels.shape[0])],
        "target_boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]] * pixels.shape[0]),
        "target_masks": torch.stack(masks),
        "target_index": torch.zeros(pixels.shape[0], dtype=torch.long),
    }
    return batch, picked


@pytest.mark.parametrize("mode", ["instruct", "pretrain"])
def test_rec_batch_yields_region_target_from_the_mask(base, mode):
    pixels = _pixels(2)
    batch, picked = _rec_batch(base, pixels)
    samples = batch_to_samples(batch, mode, base.config.chat)
    assert len(samples) == 4  # two box answers, then two segmentation samples
    seg = samples[2:]
    assert [s.key for s in seg] == ["k0" + REGION_KEY_SUFFIX, "k1" + REGION_KEY_SUFFIX]
    assert [s.region_images for s in samples] == [(), (), (1,), (1,)]
    assert torch.equal(seg[1].images[1, 0] > 0.5, batch["target_masks"][1])
    layout = base.collate(samples)
    visual = base.encode_layout(layout)
    assert visual.num_regions == 2
    region = layout.image_output
    assert region.tolist() == [False, False, False, True, False, True]
    assert layout.image_is_region.tolist() == region.tolist()
    assert visual.token_mask[region].sum(1).tolist() == [1, 1]  # one query token per slot
    for b, i in enumerate(region.nonzero()[:, 0].tolist()):
        _, tokens = _cluster_regions(base, pixels[b])
        torch.testing.assert_close(visual.tokens[i, 0], tokens[picked[b]])
    # input images keep their full SeTok tokens
    plain = base.encode_images(pixels)
    n0 = int(plain.token_mask[0].sum())
    torch.testing.assert_close(visual.tokens[0, :n0], plain.tokens[0, :n0])
    # the output slot's only regression target is the region embedding, predicted at [Img]
    out = base(layout, visual)
    sel = out.packed.visual_output
    assert int(sel.sum()) == 2
    torch.testing.assert_close(
        out.visual.tokens[out.visual.token_mask][sel], visual.tokens[region, 0]
    )


def test_instruct_prompt_matches_segment_inference(base):
    pixels = _pixels(1, seed=3)
    batch, _ = _rec_batch(base, pixels)
    seg = batch_to_samples(batch, "instruct", base.config.chat)[1]
    train = base.collate([seg])
    ids = train.text_ids[0, : int(train.text_len[0])].tolist()
    cut = ids.index(base.ids.img_start, ids.index(base.ids.img_start) + 1) + 1
    gen = base.generator()
    infer_samples, _, _ = gen._visual_prompt(pixels[0], "object 0", "Segment {}.")
    infer = base.collate(infer_samples)
    assert infer.text_ids[0, : int(infer.text_len[0])].tolist() == ids[:cut]


def test_region_embeddings_pick_best_overlap_and_skip_padding():
    tokens = torch.arange(12.0).reshape(1, 3, 4)
    clusters = torch.zeros(1, 3, 2, 2)
    clusters[0, 0, 0, :] = 1  # top row
    clusters[0, 1, 1, :] = 1  # bottom row
    clusters[0, 2] = 1  # padding slot covering everything
    mask = torch.zeros(1, 8, 8)
    mask[0, 4:, :] = 1
    valid = torch.tensor([[True, True, False]])
    torch.testing.assert_close(region_embeddings(tokens, valid, clusters, mask), tokens[:, 1])
    with pytest.raises(ValueError, match="region_masks"):
        region_embeddings(tokens, valid, clusters, mask[0])


def test_bad_target_mask_names_the_item(base):
    batch, _ = _rec_batch(base, _pixels(2))
    batch["target_masks"] = batch["target_masks"][:, :32]
    with pytest.raises(ValueError, match=r"target_masks'\]\[0\]"):
        batch_to_samples(batch, "instruct", base.config.chat)


def test_training_reduces_region_loss_and_keeps_target_frozen(base):
    model = copy.deepcopy(base)
    model.train()
    pixels = _pixels(2, seed=1)
    batch, _ = _rec_batch(model, pixels)
    layout = model.collate(batch_to_samples(batch, "instruct", model.config.chat)[2:])
    target = model.encode_layout(layout)
    assert not target.tokens.requires_grad
    before_tok = {k: v.clone() for k, v in model.vision_tokenizer.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    def region_loss() -> float:
        with torch.no_grad():
            out = model(layout)
            v = out.visual
            return float(
                embedding_regression_loss(
                    out.hidden, model.regression_head, out.packed, v.tokens, v.token_mask
                )[0]
            )

    start = region_loss()
    for _ in range(8):
        loss, metrics = stage_loss(model, layout)
        assert metrics["region_targets"] == 2.0 and metrics["visual_targets"] == 2.0
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.vision_tokenizer.parameters())
        opt.step()
    assert region_loss() < 0.5 * start
    for k, v in model.vision_tokenizer.state_dict().items():
        assert torch.equal(v, before_tok[k]), k
    torch.testing.assert_close(model.encode_layout(layout).tokens, target.tokens)


def test_key_suffix_alone_does_not_make_a_segmentation_sample(base):
    """An edit-like sample whose key ends in the suffix keeps full SeTok tokens in its output
    slot; the same sample with `region_images` set gets one region token instead."""
    pixels = _pixels(2, seed=5)
    # A valid mask too, so only the flag differs: an object (a square) on background, which
    # adaptive clustering splits into several tokens (binary noise has no structure: one token).
    pixels[1] = 0.0
    pixels[1, :, S // 4 : 3 * S // 4, S // 4 : 3 * S // 4] = 1.0
    segments = [Image(0), Text(" make it so "), Image(1, output=True)]
    plain = Sample(segments, pixels, "edit7" + REGION_KEY_SUFFIX)
    layout = base.collate([plain])
    assert layout.image_is_region.tolist() == [False, False]
    visual = base.encode_layout(layout)
    direct = base.encode_images(pixels)
    assert visual.num_regions == 0
    torch.testing.assert_close(visual.tokens, direct.tokens)
    assert torch.equal(visual.token_mask, direct.token_mask)
    assert int(visual.token_mask[1].sum()) > 1
    _, metrics = stage_loss(base, layout)
    assert metrics["region_targets"] == 0.0
    assert metrics["visual_targets"] == float(direct.token_mask[1].sum())

    flagged = base.collate([Sample(segments, pixels, "edit7", region_images=(1,))])
    assert flagged.image_is_region.tolist() == [False, True]
    region = base.encode_layout(flagged)
    assert region.num_regions == 1 and region.token_mask[1].sum() == 1


def test_region_contrast_is_cross_entropy_over_the_input_images_tokens(base):
    """The term scores each regressed region embedding against its own input image's valid
    tokens (cosine / temperature), with the picked region token as the answer."""
    from setokim.model.losses import region_contrast_loss, setokim_loss

    pixels = _pixels(2, seed=5)
    batch, picked = _rec_batch(base, pixels)
    layout = base.collate(batch_to_samples(batch, "instruct", base.config.chat))
    out = base(layout)
    regions = out.visual.regions
    assert regions is not None and regions.target.tolist() == picked
    got = region_contrast_loss(out.hidden, base.regression_head, out.packed, out.visual, 0.1)
    # the loop: find each region slot's [Img] hidden state, score against its image's tokens
    sel = out.packed.visual_output
    b = out.packed.visual_batch[sel]
    t = out.packed.visual_pos[sel] - 1
    losses = []
    for r in range(2):
        _, tokens = _cluster_regions(base, pixels[r])
        valid = base.encode_images(pixels[r : r + 1]).token_mask[0]
        pred = base.regression_head(out.hidden[b[r], t[r]])
        cos = torch.stack([F.cosine_similarity(tokens[k], pred, dim=0) for k in range(len(tokens))])
        logits = (cos / 0.1).masked_fill(~valid, float("-inf"))
        losses.append(F.cross_entropy(logits[None], torch.tensor([picked[r]])))
    torch.testing.assert_close(got, torch.stack(losses).mean(), rtol=1e-4, atol=1e-5)
    # it reaches the regression head, adds to the total with its weight, and is 0 without regions
    base.zero_grad()
    total, metrics = setokim_loss(base, out, region_contrast_weight=2.0)
    plain, _ = setokim_loss(base, out)
    torch.testing.assert_close(total, plain + 2.0 * got)
    assert metrics["region_contrast_loss"] == pytest.approx(float(got.detach()))
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in base.regression_head.parameters())  # fmt: skip
    caption = {"task": "caption", "key": ["c"], "pixels": pixels[:1], "captions": ["a star"]}
    out2 = base(base.collate(batch_to_samples(caption, "instruct", base.config.chat)))
    zero = region_contrast_loss(out2.hidden, base.regression_head, out2.packed, out2.visual, 0.1)
    assert float(zero) == 0.0


def test_region_contrast_weight_must_not_be_negative():
    with pytest.raises(ValueError, match="region_contrast_weight"):
        SeTokIMConfig(region_contrast_weight=-1.0)
