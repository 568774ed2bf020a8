"""Interleaved text/image sequences → one padded batch for the LLM.

Two halves, so that the forward pass never loops over images:

1. `collate_sequences` (CPU, in the data loader): tokenises the text segments of each
   sample, wraps every image in `[Img]` … `[/Img]`, and records where each image sits
   (after how many text tokens). The number of visual tokens per image is not known yet —
   SeTok decides it per image.
2. `pack` (in the forward, on any device): given the visual tokens of all images of the
   batch (I,K,·) with their validity mask (I,K), computes every position with cumsum /
   index arithmetic and scatters all text embeddings in one op and all visual embeddings of
   the batch in one op.

Label convention is Hugging Face's (unshifted): `labels[b,t]` is the token at t, or -100;
the loss shifts. Visual and pad positions are always -100.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

log = logging.getLogger("setokim.packing")

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Text:
    """A run of text; `train=True` puts its tokens in the loss."""

    text: str
    train: bool = False


@dataclass(frozen=True)
class Image:
    """An image of the sample (`index` into `Sample.images`).

    output=True: the model produces it (generation/editing target) — `[Img]`, `[/Img]` become
    labels and its visual tokens become regression targets.
    """

    index: int
    output: bool = False


@dataclass
class Sample:
    """One interleaved sequence: segments in order, images as (n,3,H,W) in [0,1].

    region_images: indices into `images` that are region masks (segmentation targets), not
    pictures. Each must be an output image placed after an input image of the sample: the
    model replaces its slot by ONE token, the frozen SeTok region embedding of the mask over
    the sample's first image (`SeTokIM.encode_layout`).
    """

    segments: list[Text | Image]
    images: Tensor | None = None
    key: str = ""
    region_images: tuple[int, ...] = ()


@dataclass
class SequenceLayout:
    """The collated, tokenised batch; visual token counts are filled in by `pack`.

    text_ids (B,L), text_len (B,), text_train (B,L): text tokens only, in order.
    image_sample (I,), image_after (I,): sample of each image and how many of that sample's
    text tokens come before it; images are ordered by sample, then by appearance.
    image_output (I,): images the model generates. pixels (I,3,H,W) or None when I == 0.
    image_is_region (I,) bool: the image is a region mask (`Sample.region_images`); None
    (when built by hand) means no region images.
    """

    text_ids: Tensor
    text_len: Tensor
    text_train: Tensor
    image_sample: Tensor
    image_after: Tensor
    image_output: Tensor
    pixels: Tensor | None
    padding_side: str = "right"
    keys: list[str] = field(default_factory=list)
    image_is_region: Tensor | None = None

    def __post_init__(self) -> None:
        if self.image_is_region is None:
            self.image_is_region = torch.zeros_like(self.image_sample, dtype=torch.bool)
        elif self.image_is_region.shape != self.image_sample.shape:
            raise ValueError(
                f"image_is_region must have shape {tuple(self.image_sample.shape)} (one flag per "
                f"image), got {tuple(self.image_is_region.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return int(self.text_ids.shape[0])

    @property
    def num_images(self) -> int:
        return int(self.image_sample.shape[0])

    def to(self, device: torch.device | str) -> SequenceLayout:
        """Move every tensor to `device` (the layout is built on CPU)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SequenceLayout(
            text_ids=move(self.text_ids),
            text_len=move(self.text_len),
            text_train=move(self.text_train),
            image_sample=move(self.image_sample),
            image_after=move(self.image_after),
            image_output=move(self.image_output),
            pixels=move(self.pixels),
            padding_side=self.padding_side,
            keys=list(self.keys),
            image_is_region=move(self.image_is_region),
        )


@dataclass
class Packed:
    """The LLM's input batch.

    inputs_embeds (B,T,H); attention_mask (B,T) long; position_ids (B,T); labels (B,T);
    token_ids (B,T): text ids at text positions, `pad_id` elsewhere (for inspection);
    visual_batch / visual_pos (V,): where each valid visual token went, in the order of
    `visual_mask.nonzero()`; visual_image (V,): its image; visual_output (V,): regression target?
    seq_len (B,): unpadded lengths.
    """

    inputs_embeds: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    labels: Tensor
    token_ids: Tensor
    visual_batch: Tensor
    visual_pos: Tensor
    visual_image: Tensor
    visual_output: Tensor
    seq_len: Tensor


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokens the collator inserts."""

    img_start: int
    img_end: int
    pad: int
    bos: int | None = None


def collate_sequences(
    samples: Sequence[Sample],
    tokenizer: PreTrainedTokenizerBase,
    ids: SpecialIds,
    *,
    padding_side: str = "right",
    add_bos: bool = True,
    max_text_tokens: int | None = None,
    wrap_images: bool = True,
) -> SequenceLayout:
    """Tokenise `samples` into a `SequenceLayout` (loops over samples on CPU; that is fine here).

    wrap_images=False leaves out the `[Img]`/`[/Img]` markers (LLaVA-format models).
    max_text_tokens: a longer sample is cut to that many tokens (as LLaVA cuts at
    model_max_length) rather than stopping a long run; an image whose span would be cut is
    dropped whole, with the text from its `[Img]` on. Each cut is logged with the key.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if len(samples) == 0:
        raise ValueError("samples is empty")
    all_ids: list[list[int]] = []
    all_train: list[list[bool]] = []
    img_sample: list[int] = []
    img_after: list[int] = []
    img_output: list[bool] = []
    img_region: list[bool] = []
    pixels: list[Tensor] = []
    image_shape: tuple[int, ...] | None = None
    for b, sample in enumerate(samples):
        first_image_index = len(img_sample)
        tok_ids: list[int] = [ids.bos] if add_bos and ids.bos is not None else []
        train: list[bool] = [False] * len(tok_ids)
        n_images = 0 if sample.images is None else int(sample.images.shape[0])
        if sample.images is not None and (sample.images.dim() != 4 or sample.images.shape[1] != 3):
            raise ValueError(
                f"samples[{b}].images must be (n,3,H,W), got {tuple(sample.images.shape)}"
            )
        regions = _region_indices(sample, b, n_images)
        placed: set[int] = set()
        first_image = True
        for seg in sample.segments:
            if isinstance(seg, Text):
                piece = tokenizer(seg.text, add_special_tokens=False)["input_ids"]
                tok_ids.extend(piece)
                train.extend([seg.train] * len(piece))
            elif isinstance(seg, Image):
                if not 0 <= seg.index < n_images:
                    raise ValueError(
                        f"samples[{b}] refers to image {seg.index} but has {n_images} images"
                    )
                if seg.index in regions:
                    if not seg.output:
                        raise ValueError(
                            f"samples[{b}].region_images names image {seg.index}, which is used "
                            "as an input; a region mask must be an output image"
                        )
                    if first_image:
                        raise ValueError(
                            f"samples[{b}]: region image {seg.index} comes first; the input "
                            "image its mask refers to must come before it"
                        )
                placed.add(seg.index)
                first_image = False
                img = sample.images[seg.index]
                if image_shape is None:
                    image_shape = tuple(img.shape)
                elif tuple(img.shape) != image_shape:
                    raise ValueError(
                        f"samples[{b}].images[{seg.index}] has shape {tuple(img.shape)}, "
                        f"the batch uses {image_shape}; resize images in the loader"
                    )
                if wrap_images:
                    tok_ids.append(ids.img_start)
                    train.append(seg.output)
                img_sample.append(b)
                img_after.append(len(tok_ids))
                img_output.append(seg.output)
                img_region.append(seg.index in regions)
                pixels.append(img)
                if wrap_images:
                    tok_ids.append(ids.img_end)
                    train.append(seg.output)
            else:
                raise TypeError(f"samples[{b}] has a segment of type {type(seg).__name__}")
        unplaced = sorted(regions - placed)
        if unplaced:
            raise ValueError(f"samples[{b}].region_images {unplaced} are not placed in segments")
        if max_text_tokens is not None and len(tok_ids) > max_text_tokens:
            cut = max_text_tokens
            for j in range(first_image_index, len(img_sample)):  # this sample's, in order
                opens = img_after[j] - 1 if wrap_images else img_after[j]
                closes = img_after[j] + 1 if wrap_images else img_after[j]
                if closes > cut:  # its span would be cut: drop it and every later image
                    cut = min(cut, opens)
                    for kept in (img_sample, img_after, img_output, img_region, pixels):
                        del kept[j:]
                    break
            log.warning(
                "samples[%d] (key %r): %d text tokens cut to %d (max_text_tokens=%d)",
                b, sample.key, len(tok_ids), cut, max_text_tokens,
            )  # fmt: skip
            tok_ids, train = tok_ids[:cut], train[:cut]
        all_ids.append(tok_ids)
        all_train.append(train)
    length = max(1, max(len(t) for t in all_ids))
    text_ids = torch.full((len(samples), length), ids.pad, dtype=torch.long)
    text_train = torch.zeros((len(samples), length), dtype=torch.bool)
    for b, (t, m) in enumerate(zip(all_ids, all_train, strict=True)):
        text_ids[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        text_train[b, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return SequenceLayout(
        text_ids=text_ids,
        text_len=torch.tensor([len(t) for t in all_ids], dtype=torch.long),
        text_train=text_train,
        image_sample=torch.tensor(img_sample, dtype=torch.long),
        image_after=torch.tensor(img_after, dtype=torch.long),
        image_output=torch.tensor(img_output, dtype=torch.bool),
        pixels=torch.stack(pixels).float() if pixels else None,
        padding_side=padding_side,
        keys=[s.key for s in samples],
        image_is_region=torch.tensor(img_region, dtype=torch.bool),
    )


def _region_indices(sample: Sample, b: int, n_images: int) -> set[int]:
    """`sample.region_images` as a set, checked against the sample's image count."""
    out: set[int] = set()
    for r in sample.region_images:
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < n_images:
            raise ValueError(
                f"samples[{b}].region_images holds {r!r}; expected image indices in [0, {n_images})"
            )
        out.add(r)
    return out


def pack(
    layout: SequenceLayout,
    text_embeds: Tensor,
    visual_embeds: Tensor,
    visual_mask: Tensor,
    *,
    pad_id: int = 0,
) -> Packed:
    """Scatter text embeddings (B,L,H) and visual embeddings (I,K,H) into (B,T,H).

    `visual_mask` (I,K) bool marks each image's real tokens (any pattern, e.g. SeTok's
    `token_mask`); image i occupies `visual_mask[i].sum()` consecutive positions.
    """
    B, L = layout.text_ids.shape
    device = text_embeds.device
    if text_embeds.shape[:2] != (B, L):
        raise ValueError(f"text_embeds must be ({B},{L},H), got {tuple(text_embeds.shape)}")
    I = layout.num_images  # noqa: E741
    if visual_embeds.shape[0] != I or visual_mask.shape != visual_embeds.shape[:2]:
        raise ValueError(
            f"visual_embeds (I,K,H) and visual_mask (I,K) must cover the layout's {I} images, "
            f"got {tuple(visual_embeds.shape)} and {tuple(visual_mask.shape)}"
        )
    if visual_embeds.shape[-1] != text_embeds.shape[-1]:
        raise ValueError(
            f"visual_embeds width {visual_embeds.shape[-1]} != text width {text_embeds.shape[-1]}"
        )
    visual_mask = visual_mask.to(device=device, dtype=torch.bool)
    sample = layout.image_sample.to(device)
    after = layout.image_after.to(device)
    text_len = layout.text_len.to(device)

    n = visual_mask.sum(1)  # (I,) visual tokens per image
    totals = torch.zeros(B, dtype=torch.long, device=device).index_add_(0, sample, n)
    # Start of each image inside its own sample: its insertion point plus the visual tokens
    # of the sample's earlier images (a per-sample exclusive cumsum, done globally).
    excl = torch.cumsum(n, 0) - n
    sample_excl = torch.cumsum(totals, 0) - totals
    start = after + excl - sample_excl[sample]
    # Each text token moves right by the visual tokens inserted at or before it.
    inserted = torch.zeros(B, L + 1, dtype=torch.long, device=device)
    inserted.index_put_((sample, after), n, accumulate=True)
    text_pos = torch.arange(L, device=device) + torch.cumsum(inserted, 1)[:, :L]
    seq_len = text_len + totals
    T = max(int(seq_len.max()), 1)
    offset = (T - seq_len) if layout.padding_side == "left" else torch.zeros_like(seq_len)

    text_valid = torch.arange(L, device=device)[None, :] < text_len[:, None]
    tb = torch.arange(B, device=device)[:, None].expand(B, L)[text_valid]
    tt = (text_pos + offset[:, None])[text_valid]
    K = visual_mask.shape[1]
    rank = torch.cumsum(visual_mask.long(), 1) - 1
    vb = sample[:, None].expand(I, K)[visual_mask]
    vt = (start + offset[sample])[:, None].expand(I, K)[visual_mask] + rank[visual_mask]
    vi = torch.arange(I, device=device)[:, None].expand(I, K)[visual_mask]

    H = text_embeds.shape[-1]
    embeds = text_embeds.new_zeros(B, T, H)
    embeds = embeds.index_put((tb, tt), text_embeds[text_valid])
    embeds = embeds.index_put((vb, vt), visual_embeds[visual_mask].to(embeds.dtype))

    positions = torch.arange(T, device=device)[None, :]
    attention_mask = (
        (positions >= offset[:, None]) & (positions < (offset + seq_len)[:, None])
    ).long()
    position_ids = (torch.cumsum(attention_mask, 1) - 1).clamp(min=0)
    text_ids = layout.text_ids.to(device)
    token_ids = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    token_ids[tb, tt] = text_ids[text_valid]
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long, device=device)
    text_labels = torch.where(layout.text_train.to(device), text_ids, IGNORE_INDEX)
    labels[tb, tt] = text_labels[text_valid]
    return Packed(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        labels=labels,
        token_ids=token_ids,
        visual_batch=vb,
        visual_pos=vt,
        visual_image=vi,
        visual_output=layout.image_output.to(device)[vi],
        seq_len=seq_len,
    )
