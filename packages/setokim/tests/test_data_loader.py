"""The shard loader: split by rank/worker without repeats, resume, task views, collation."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from setokim.data.generate import generate_dataset
from setokim.data.loader import make_loader
from setokim.data.rle import decode_mask
from setokim.data.schema import BATCH_FIELDS, COMMON_FIELDS, VIEWS, SampleAnnotation

N_TRAIN = 24


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("sw")
    generate_dataset(out, N_TRAIN, 6, 0, 64, seed=0, samples_per_shard=5)  # 5 train shards
    return out


def keys(loader) -> list[str]:
    return [k for b in loader for k in b["key"]]


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (2, 0), (3, 2), (7, 0)])
def test_every_sample_once_per_epoch_across_ranks_and_workers(shards, world_size, num_workers):
    per_rank = [
        keys(
            make_loader(
                shards,
                "train",
                "caption",
                3,
                rank=r,
                world_size=world_size,
                num_workers=num_workers,
                even=False,
            )
        )
        for r in range(world_size)
    ]
    everything = [k for ks in per_rank for k in ks]
    assert len(everything) == len(set(everything)) == N_TRAIN
    even = [
        len(keys(make_loader(shards, "train", "caption", 3, rank=r, world_size=world_size)))
        for r in range(world_size)
    ]
    assert len(set(even)) == 1, f"even=True must give equal counts per rank, got {even}"


def test_workers_do_not_change_the_batches(shards):
    base = [b["key"] for b in make_loader(shards, "train", "vqa", 4, num_workers=0)]
    for nw in (2,):
        assert [b["key"] for b in make_loader(shards, "train", "vqa", 4, num_workers=nw)] == base


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (2, 0), (2, 2)])
def test_resume_from_a_sample_position_equals_the_tail(shards, num_workers, world_size):
    full = keys(make_loader(shards, "train", "rec", 4, world_size=world_size, rank=world_size - 1))
    for start in (3, 8, len(full) - 1) if num_workers == 0 else (5,):
        tail = make_loader(
            shards, "train", "rec", 4, world_size=world_size, rank=world_size - 1,
            start_sample=start, num_workers=num_workers,
        )  # fmt: skip
        assert keys(tail) == full[start:]
        assert len(tail) == -(-(len(full) - start) // 4)


def test_seed_and_epoch_shuffle_deterministically(shards):
    e0 = keys(make_loader(shards, "train", "caption", 5, seed=1, epoch=0))
    assert keys(make_loader(shards, "train", "caption", 5, seed=1, epoch=0)) == e0
    e1 = keys(make_loader(shards, "train", "caption", 5, seed=1, epoch=1))
    assert e1 != e0 and sorted(e1) == sorted(e0)
    plain = keys(make_loader(shards, "train", "caption", 5, shuffle=False))
    assert plain == sorted(plain)


def test_batch_layout_and_content_for_every_task(shards):
    for task in VIEWS:
        batches = list(make_loader(shards, "train", task, 4, shuffle=False))
        assert sum(len(b["key"]) for b in batches) == N_TRAIN
        b = batches[0]
        assert set(b) == set(COMMON_FIELDS) | set(BATCH_FIELDS[task]), task
        assert (
            b["task"] == task
            and b["pixels"].shape == (4, 3, 64, 64)
            and b["pixels"].dtype == torch.float32
        )
        assert 0.0 <= b["pixels"].min() and b["pixels"].max() <= 1.0
        bsz, n_obj = b["object_valid"].shape
        assert b["object_masks"].shape == (bsz, n_obj, 64, 64) and b["boxes"].shape == (
            bsz,
            n_obj,
            4,
        )
        # padding rows are empty; real rows are the JSON objects
        assert not b["object_masks"][~b["object_valid"]].any()
        assert [len(n) for n in b["object_names"]] == b["object_valid"].sum(1).tolist()
        for name in BATCH_FIELDS[task]:
            v = b[name]
            assert len(v) == bsz, (task, name)
        if task in ("rec", "reasonseg"):
            idx = b["target_index"]
            assert torch.equal(b["target_masks"], b["object_masks"][torch.arange(bsz), idx])
            assert b["object_valid"][torch.arange(bsz), idx].all()
        if task == "edit":
            assert b["target_pixels"].shape == b["pixels"].shape
            assert (b["target_pixels"] - b["pixels"]).abs().sum((1, 2, 3)).gt(0).all()


def test_image_view_reads_samples_without_any_text(shards, tmp_path):
    """Stage I reads the image view: a dataset without captions (SA-1B) is not skipped."""
    from dataclasses import replace

    from setokim.data.converters.common import Converted, write_split
    from setokim.data.shards import iter_tar_samples

    def bare():
        for tar in sorted(shards.glob("train-*.tar")):
            for _, sample in iter_tar_samples(tar):
                ann = SampleAnnotation.from_json(sample["json"])
                ann = replace(ann, captions=[], vqa=[], pope=[], rec=[], reasonseg=[], edit=[],
                              t2i=[], conversations=[])  # fmt: skip
                yield Converted(ann, sample["png"], "png")

    write_split(tmp_path, "train", bare(), source="bare", samples_per_shard=10)
    assert keys(make_loader(tmp_path, "train", "caption", 4, shuffle=False)) == []
    got = list(make_loader(tmp_path, "train", "image", 4, shuffle=False))
    ref = list(make_loader(shards, "train", "caption", 4, shuffle=False))
    assert [b["key"] for b in got] == [b["key"] for b in ref]
    for g, r in zip(got, ref, strict=True):
        assert set(g) == set(COMMON_FIELDS) and g["task"] == "image"
        assert torch.equal(g["pixels"], r["pixels"])
        assert torch.equal(g["object_masks"], r["object_masks"])
    with pytest.raises(ValueError, match="mix_weights"):
        make_loader(tmp_path, "train", "mix", 4, mix_weights={"image": 1.0})


def test_masks_and_boxes_match_the_json(shards):
    import tarfile

    with tarfile.open(shards / "train-000000.tar") as tar:
        ann = SampleAnnotation.from_json(tar.extractfile("train-00000000.json").read())
    batch = next(iter(make_loader(shards, "train", "caption", 1, shuffle=False)))
    assert batch["key"] == ["train-00000000"]
    for i, o in enumerate(ann.objects):
        assert torch.equal(batch["object_masks"][0, i], torch.from_numpy(decode_mask(o.mask)))
        assert batch["boxes"][0, i].tolist() == o.bbox


def test_image_size_resizes_pixels_masks_and_boxes(shards):
    small = next(iter(make_loader(shards, "train", "rec", 2, shuffle=False, image_size=32)))
    full = next(iter(make_loader(shards, "train", "rec", 2, shuffle=False)))
    assert small["pixels"].shape == (2, 3, 32, 32) and small["object_masks"].shape[-2:] == (32, 32)
    assert torch.allclose(small["boxes"], full["boxes"] / 2)
    assert small["target_masks"].shape == (2, 32, 32)


def test_expand_yields_every_item(shards):
    import json

    card = json.loads((shards / "dataset_card.json").read_text())
    items = keys(make_loader(shards, "train", "vqa", 7, expand=True))
    assert len(items) == card["splits"]["train"]["items"]["vqa"] == len(set(items))
    assert all("#" in k for k in items)


def test_mix_follows_the_weights(shards):
    tasks = Counter(
        b["task"] for b in make_loader(shards, "train", "mix", 1, mix_weights={"vqa": 1, "pope": 1})
    )
    assert set(tasks) == {"vqa", "pope"} and sum(tasks.values()) == N_TRAIN
    only = {
        b["task"]
        for b in make_loader(shards, "train", "mix", 2, mix_weights={"edit": 1.0, "rec": 0.0})
    }
    assert only == {"edit"}


def test_bad_arguments_are_named(shards, tmp_path):
    with pytest.raises(ValueError, match="task"):
        make_loader(shards, "train", "nope", 2)
    with pytest.raises(ValueError, match="on_error"):
        make_loader(shards, "train", "vqa", 2, on_error="ignore")
    with pytest.raises(ValueError, match="rank"):
        make_loader(shards, "train", "vqa", 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="split"):
        make_loader(shards, "test2", "vqa", 2)
    with pytest.raises(ValueError, match="start_sample"):
        make_loader(shards, "train", "vqa", 2, start_sample=-1)
    with pytest.raises(FileNotFoundError, match="shard_dir"):
        make_loader(tmp_path, "train", "vqa", 2)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(shards, "train", "vqa", 0)
