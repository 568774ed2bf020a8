"""Task mixes over data where samples carry different tasks.

The shards are Shapes World samples written with the project's own ShardWriter after
stripping tasks by index: i % 4 == 0 keeps only captions, 1 only a conversation, 2 captions
+ VQA + a conversation, 3 only POPE (none of the mix's tasks). The mix also names t2i,
which no sample has.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from setokim.data import loader as loader_mod
from setokim.data.config import DataConfig
from setokim.data.generate import ShapesWorld
from setokim.data.loader import make_loader
from setokim.data.mix_plan import draw_task, index_shard
from setokim.data.schema import TASKS, SampleAnnotation
from setokim.data.shards import ShardWriter, write_manifest
from setokim.stages.common import endless_batches, epoch_batches
from setokim.train.config import TrainerConfig, resolve_schedule

N = 64
WEIGHTS = {"caption": 1.0, "vqa": 2.0, "chat": 1.0, "t2i": 1.0}
GROUPS = {0: {"caption"}, 1: {"chat"}, 2: {"caption", "vqa", "chat"}, 3: set()}  # mix tasks
STRIP = ("vqa", "pope", "rec", "reasonseg", "edit", "t2i", "conversations", "captions")
KEEP = {0: {"captions"}, 1: {"conversations"}, 2: {"captions", "vqa", "conversations"}}


def _index(key: str) -> int:
    return int(key.split("#")[0].rsplit("-", 1)[1])


def _tasks(key: str) -> set[str]:
    return GROUPS[_index(key) % 4]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mix")
    world = ShapesWorld(seed=3, image_size=32)
    with ShardWriter(out, "train", samples_per_shard=8) as writer:
        for i, (ann, files) in enumerate(world.iter_split("train", N)):
            keep = KEEP.get(i % 4, {"pope"})
            for name in STRIP:
                if name not in keep:
                    setattr(ann, name, [])
            files = {k: v for k, v in files.items() if k != "target.png"}
            files["json"] = ann.to_json()
            writer.write(ann.key, files)
    write_manifest(out, {"train": writer.shards}, {"source": "test_mix"})
    return out


def _mix(shards: Path, bsz: int, **kw: object):
    kw = {"mix_weights": WEIGHTS, "shuffle_buffer": 4, **kw}
    return make_loader(shards, "train", "mix", bsz, **kw)  # type: ignore[arg-type]


def _seq(loader) -> list[tuple[str, list[str]]]:
    return [(b["task"], b["key"]) for b in loader]


@pytest.mark.parametrize(("world_size", "expand"), [(1, False), (2, False), (1, True), (3, True)])
def test_batches_are_full_single_task_and_drawn_from_what_a_sample_has(
    shards, world_size, expand, monkeypatch, caplog
):
    monkeypatch.setattr(loader_mod, "_WARNED_ABSENT", set())
    seen: list[list[str]] = []
    with caplog.at_level(logging.WARNING, logger="setokim.data"):
        for rank in range(world_size):
            ld = _mix(shards, 4, rank=rank, world_size=world_size, expand=expand)
            batches = list(ld)
            assert len(batches) == len(ld) == ld.full_batches > 0
            for b in batches:
                assert len(b["key"]) == 4 and b["pixels"].shape[0] == 4, b["key"]
                assert b["task"] in {"caption", "vqa", "chat"}
                assert all(b["task"] in _tasks(k) for k in b["key"]), (b["task"], b["key"])
            seen.append([k for b in batches for k in b["key"]])
    assert len({len(ks) for ks in seen}) == 1, "even: every rank yields the same batch count"
    flat = [k for ks in seen for k in ks]
    assert len(flat) == len(set(flat)), "an item came twice in one epoch"
    if not expand:  # sample keys: each once, on one rank
        assert not any(_index(k) % 4 == 3 for k in flat)
    absent = [r.getMessage() for r in caplog.records if "never drawn" in r.getMessage()]
    assert len(absent) == 1 and "'t2i'" in absent[0]  # once, however many loaders


def test_expanded_samples_split_across_batches_keep_every_item_once(shards):
    ld = _mix(shards, 3, expand=True, shuffle=False)
    batches = list(ld)
    items = Counter(k for b in batches for k in b["key"])
    assert max(items.values()) == 1 and all("#" in k for k in items)
    drawn = ld.rank_items[0]
    assert sum(drawn.values()) - len(items) < 3 * len(drawn)  # only leftovers are dropped
    by_sample: dict[str, set[int]] = {}
    for b in batches:
        for k in b["key"]:
            by_sample.setdefault(k.split("#")[0], set()).add(int(k.split("#")[1]))
    split = [
        s for s in by_sample if sum(s in {k.split("#")[0] for k in b["key"]} for b in batches) > 1
    ]
    assert split, "with batch 3 some expanded sample must overflow into a second batch"
    for s in split:  # its items are consecutive, so none was lost at the split
        js = sorted(by_sample[s])
        assert js == list(range(js[0], js[0] + len(js)))


def test_the_index_counts_what_the_annotation_offers(shards):
    import tarfile

    entries = [e for p in sorted(shards.glob("train-*.tar")) for e in index_shard(p)]
    assert [e.key for e in entries] == [f"train-{i:08d}" for i in range(N)]
    with tarfile.open(shards / "train-000001.tar") as tar:
        ann = SampleAnnotation.from_json(tar.extractfile("train-00000010.json").read())
    assert entries[10].items == tuple(ann.num_items(t) for t in TASKS)
    assert {t for t, n in zip(TASKS, entries[10].items, strict=True) if n} == {
        "caption", "vqa", "chat"
    }  # fmt: skip


def test_draws_follow_the_weights_restricted_to_the_sample():
    every = (1,) * len(TASKS)
    full = Counter(draw_task(5, 0, f"k{i}", every, WEIGHTS) for i in range(4000))
    for task, p in (("caption", 0.2), ("vqa", 0.4), ("chat", 0.2), ("t2i", 0.2)):
        assert abs(full[task] / 4000 - p) < 0.03, (task, full)
    two = tuple(int(t in ("caption", "chat")) for t in TASKS)
    pair = Counter(draw_task(5, 0, f"k{i}", two, WEIGHTS) for i in range(4000))
    assert set(pair) == {"caption", "chat"} and abs(pair["caption"] / 4000 - 0.5) < 0.03
    assert draw_task(5, 0, "k", (0,) * len(TASKS), WEIGHTS) is None
    assert draw_task(5, 0, "k", two, {"chat": 0.0, "caption": 1.0}) == "caption"
    epoch1 = [draw_task(5, 1, f"k{i}", every, WEIGHTS) for i in range(200)]
    assert epoch1 != [draw_task(5, 0, f"k{i}", every, WEIGHTS) for i in range(200)]


def test_loader_task_frequencies_follow_the_weights(shards):
    """Over 8 epochs, the 3-task samples go 1:2:1 to caption:vqa:chat (loose bound)."""
    counts: Counter[str] = Counter()
    for epoch in range(8):
        for task, keys in _seq(_mix(shards, 1, epoch=epoch)):
            counts.update(task for k in keys if _index(k) % 4 == 2)
    total = sum(counts.values())
    assert total == 8 * N // 4
    assert abs(counts["vqa"] / total - 0.5) < 0.12 and abs(counts["caption"] / total - 0.25) < 0.1


def test_samples_without_a_mix_task_are_counted_and_logged(shards, caplog):
    ld = _mix(shards, 4)
    assert ld.no_task == N // 4
    with caplog.at_level(logging.WARNING, logger="setokim.data"):
        list(ld)
    assert any("16 samples have none of the mix tasks" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("expand", [False, True])
def test_resume_at_every_batch_equals_the_tail(shards, expand):
    full = _seq(_mix(shards, 4, world_size=2, rank=1, expand=expand, epoch=2))
    assert len(full) >= 4
    for b in range(len(full) + 1):
        tail = _mix(shards, 4, world_size=2, rank=1, expand=expand, epoch=2, start_batch=b)
        assert len(tail) == len(full) - b
        assert _seq(tail) == full[b:], b


def test_workers_give_the_batches_of_one_process(shards):
    base = _seq(_mix(shards, 4, expand=True))
    assert _seq(_mix(shards, 4, expand=True, num_workers=2)) == base
    assert _seq(_mix(shards, 4, expand=True, num_workers=2, start_batch=3)) == base[3:]


def test_single_task_mode_keeps_chunks_of_raw_samples(shards):
    """task != "mix": chunks of batch_size raw samples, minus the samples without the task."""
    ld = make_loader(shards, "train", "chat", 8, shuffle_buffer=4)
    order = [raw["__key__"] for raw in ld.dataset.raw_stream()]
    chunks = [[k for k in order[i : i + 8] if "chat" in _tasks(k)] for i in range(0, N, 8)]
    assert [b["key"] for b in ld] == [c for c in chunks if c]
    assert ld.full_batches == N // 8  # the count endless_batches plans with (batches are short)


def _data(shards: Path, **kw: object) -> DataConfig:
    base = DataConfig(
        shard_dir=str(shards), task="mix", mix_weights=dict(WEIGHTS), shuffle_buffer=4
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def _take(it, n: int) -> list[tuple[str, list[str]]]:
    return [(b["task"], b["key"]) for b, _ in zip(it, range(n), strict=False)]


def test_endless_batches_run_three_epochs_and_resume_exactly(shards):
    data = _data(shards)
    per_epoch = [_mix(shards, 4, world_size=2, rank=1, epoch=e).full_batches for e in range(3)]
    total = sum(per_epoch)
    stream = _take(endless_batches(data, 1, 2, 0, 4), total + 2)
    assert len(stream) == total + 2 and all(len(keys) == 4 for _, keys in stream)
    for e in range(3):  # epoch e is exactly that epoch's loader
        start = sum(per_epoch[:e])
        assert stream[start : start + per_epoch[e]] == _seq(
            _mix(shards, 4, world_size=2, rank=1, epoch=e)
        )
    for s in sorted({1, per_epoch[0] - 1, per_epoch[0], per_epoch[0] + 1, total - 1, total}):
        assert _take(endless_batches(data, 1, 2, s, 4), 2) == stream[s : s + 2], s


def test_endless_batches_survive_a_caption_chat_split(tmp_path, shards):
    """The reported crash: samples with different tasks, shuffle_buffer 4, micro-batch 8."""
    cases = (
        ("mix", {"caption": 1.0, "chat": 1.0}),  # short batches before
        ("mix", {"caption": 1.0, "t2i": 1.0}),  # t2i in no sample: empty chunks, then the crash
        ("chat", {}),  # one task over samples that lack it: short batches, rolls over
    )
    for task, weights in cases:
        data = _data(shards, task=task, mix_weights=weights)
        got = _take(endless_batches(data, 0, 1, 0, 8), 3 * (N // 8))
        assert len(got) == 3 * (N // 8)
        if task == "mix":
            assert all(len(keys) == 8 for _, keys in got)


@dataclass
class _NoGen:
    generate_if_missing: bool = False
    generate_train: int = 0
    generate_image_size: int = 32
    generate_seed: int = 0


@pytest.mark.parametrize("world_size", [1, 2])
def test_epoch_batches_is_what_endless_batches_yields_in_one_epoch(shards, world_size):
    data = _data(shards)
    for micro in (2, 4, 8):
        counts = [epoch_batches(data, r, world_size, micro, _NoGen()) for r in range(world_size)]
        n = counts[0]
        assert n > 0 and counts == [n] * world_size, "every rank must derive the same max_steps"
        items = _mix(shards, micro, world_size=world_size).rank_items  # per-task batches
        assert n == min(sum(k // micro for k in r.values()) for r in items)
        cfg = TrainerConfig(micro_batch_size=micro, epochs=1.0)
        assert resolve_schedule(cfg, n, world_size).max_steps == n
        for rank in range(world_size):
            stream = _take(endless_batches(data, rank, world_size, 0, micro), n + 1)
            loader = dict(world_size=world_size, rank=rank)
            assert stream[:n] == _seq(_mix(shards, micro, **loader))  # epoch 0: n batches
            assert stream[n:] == _take(iter(_mix(shards, micro, epoch=1, **loader)), 1)
    single = epoch_batches(_data(shards, task="caption"), 0, world_size, 4, _NoGen())
    assert single == (N // world_size) // 4


def test_bad_resume_arguments_are_named(shards):
    with pytest.raises(ValueError, match="start_batch"):
        _mix(shards, 4, start_batch=-1)
    with pytest.raises(ValueError, match="start_sample"):
        _mix(shards, 4, start_sample=4)
    with pytest.raises(ValueError, match="not both"):
        make_loader(shards, "train", "caption", 4, start_sample=4, start_batch=1)
