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


@dataclass
class _Row:
    """One sample tokenised: its token ids and train flags, and per image (in order) the
    position after which it sits, whether it is an output or a region mask, its pixels."""

    ids: list[int]
    train: list[bool]
    after: list[int] = field(default_factory=list)
    output: list[bool] = field(default_factory=list)
    region: list[bool] = field(default_factory=list)
    pixels: list[Tensor] = field(default_factory=list)
    image_shape: tuple[int, ...] | None = None  # the first image's, before any cut


def _sample_row(
    sample: Sample,
    b: int,
    tokenizer: PreTrainedTokenizerBase,
    ids: SpecialIds,
    image_shape: tuple[int, ...] | None,
    *,
    add_bos: bool,
    wrap_images: bool,
    max_text_tokens: int | None,
) -> _Row:
    """Tokenise `samples[b]`; its images must have `image_shape` (the batch's, if known)."""
    bos = [ids.bos] if add_bos and ids.bos is not None else []
    row = _Row(ids=bos, train=[False] * len(bos), image_shape=image_shape)
    n_images = 0 if sample.images is None else int(sample.images.shape[0])
    if sample.images is not None and (sample.images.dim() != 4 or sample.images.shape[1] != 3):
        raise ValueError(f"samples[{b}].images must be (n,3,H,W), got {tuple(sample.images.shape)}")
    regions = _region_indices(sample, b, n_images)
    placed: set[int] = set()
    for seg in sample.segments:
        if isinstance(seg, Text):
            piece = tokenizer(seg.text, add_special_tokens=False)["input_ids"]
            row.ids.extend(piece)
            row.train.extend([seg.train] * len(piece))
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
                if not placed:
                    raise ValueError(
                        f"samples[{b}]: region image {seg.index} comes first; the input "
                        "image its mask refers to must come before it"
                    )
            placed.add(seg.index)
            img = sample.images[seg.index]
            if row.image_shape is None:
                row.image_shape = tuple(img.shape)
            elif tuple(img.shape) != row.image_shape:
                raise ValueError(
                    f"samples[{b}].images[{seg.index}] has shape {tuple(img.shape)}, "
                    f"the batch uses {row.image_shape}; resize images in the loader"
                )
            if wrap_images:
                row.ids.append(ids.img_start)
                row.train.append(seg.output)
            row.after.append(len(row.ids))
            row.output.append(seg.output)
            row.region.append(seg.index in regions)
            row.pixels.append(img)
            if wrap_images:
                row.ids.append(ids.img_end)
                row.train.append(seg.output)
        else:
            raise TypeError(f"samples[{b}] has a segment of type {type(seg).__name__}")
    unplaced = sorted(regions - placed)
    if unplaced:
        raise ValueError(f"samples[{b}].region_images {unplaced} are not placed in segments")
    if max_text_tokens is not None and len(row.ids) > max_text_tokens:
        _cut(row, max_text_tokens, wrap_images, f"samples[{b}] (key {sample.key!r})")
    return row


def _cut(row: _Row, max_text_tokens: int, wrap_images: bool, where: str) -> None:
    """Cut `row` to `max_text_tokens`; an image whose span would be cut goes whole, with every
    later image and the text from its `[Img]` on. The cut is logged."""
    cut = max_text_tokens
    for j, after in enumerate(row.after):
        opens = after - 1 if wrap_images else after
        closes = after + 1 if wrap_images else after
        if closes > cut:
            cut = min(cut, opens)
            for kept in (row.after, row.output, row.region, row.pixels):
                del kept[j:]
            break
    log.warning(
        "%s: %d text tokens cut to %d (max_text_tokens=%d)",
        where, len(row.ids), cut, max_text_tokens,
    )  # fmt: skip
    row.ids, row.train = row.ids[:cut], row.train[:cut]


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
    rows: list[_Row] = []
    image_shape: tuple[int, ...] | None = None
    for b, sample in enumerate(samples):
        row = _sample_row(
            sample, b, tokenizer, ids, image_shape,
            add_bos=add_bos, wrap_images=wrap_images, max_text_tokens=max_text_tokens,
        )  # fmt: skip
        image_shape = row.image_shape
        rows.append(row)
    length = max(1, max(len(r.ids) for r in rows))
    text_ids = torch.full((len(samples), length), ids.pad, dtype=torch.long)
    text_train = torch.zeros((len(samples), length), dtype=torch.bool)
    for b, r in enumerate(rows):
        text_ids[b, : len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
        text_train[b, : len(r.train)] = torch.tensor(r.train, dtype=torch.bool)
    pixels = [p for r in rows for p in r.pixels]
    return SequenceLayout(
        text_ids=text_ids,
        text_len=torch.tensor([len(r.ids) for r in rows], dtype=torch.long),
        text_train=text_train,
        image_sample=torch.tensor(
            [b for b, r in enumerate(rows) for _ in r.after], dtype=torch.long
        ),
        image_after=torch.tensor([a for r in rows for a in r.after], dtype=torch.long),
        image_output=torch.tensor([o for r in rows for o in r.output], dtype=torch.bool),
        pixels=torch.stack(pixels).float() if pixels else None,
        padding_side=padding_side,
        keys=[s.key for s in samples],
        image_is_region=torch.tensor([g for r in rows for g in r.region], dtype=torch.bool),
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
