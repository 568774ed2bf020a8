"""DataLoader workers read only the samples they decode, and still yield the 0-worker batches.

Every worker walks the rank's whole stream, but non-owned samples come out of the tar reader
as key-only stubs. These tests compare whole batches (keys and tensors) across worker counts,
and record what the reader hands each worker (wrapping `raw_stream`, the real tar reader
underneath) to check that a worker reads exactly the samples of its own batches.
"""

from __future__ import annotations

import io
import logging
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from setokim.data.config import DataConfig
from setokim.data.decode import DataError
from setokim.data.generate import ShapesWorld, generate_dataset
from setokim.data.loader import ShardDataset, make_loader
from setokim.data.mix_plan import clear_index_cache
from setokim.data.shard_index import INDEX_SUFFIX
from setokim.data.shards import MANIFEST_NAME, ShardWriter, write_manifest

N = 30
MIX = {"caption": 1.0, "vqa": 1.0, "rec": 2.0, "pope": 1.0}
STUB = {"__key__", "__url__"}

# (task, batch_size, start (sample for one task, batch for a mix), world_size, rank, extra)
CASES = [
    ("caption", 3, 0, 1, 0, {}),
    ("vqa", 4, 5, 2, 1, {"expand": True}),
    ("rec", 2, 3, 2, 0, {"split_mode": "sample", "shuffle_buffer": 5}),
    ("pope", 5, 0, 3, 2, {"even": False}),
    ("mix", 3, 0, 1, 0, {"mix_weights": MIX}),
    ("mix", 4, 2, 2, 1, {"mix_weights": MIX, "expand": True}),
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("workers")
    generate_dataset(out, N, 0, 0, 32, seed=0, samples_per_shard=4)  # 8 shards, the last of 2
    return out


@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 samples of which only every 5th has VQA: most chunks of a VQA loader give no batch."""
    out = tmp_path_factory.mktemp("sparse")
    with ShardWriter(out, "train", samples_per_shard=6) as writer:
        for i, (ann, files) in enumerate(
            ShapesWorld(seed=2, image_size=32).iter_split("train", 24)
        ):
            if i % 5:
                ann.vqa = []
            writer.write(ann.key, {**files, "json": ann.to_json()})
    write_manifest(out, {"train": writer.shards}, {"source": "test_workers"})
    return out


def _loader(shards: Path, case: tuple, num_workers: int = 0, **kw: Any):
    task, bsz, start, ws, rank, extra = case
    planned = task == "mix" or extra.get("expand")  # one task with expand: a one-task mix
    where = {"start_batch" if planned else "start_sample": start}
    return make_loader(
        shards, "train", task, bsz, rank=rank, world_size=ws, num_workers=num_workers,
        seed=1, **where, **extra, **kw,
    )  # fmt: skip


def _sample_key(item_key: str) -> str:
    return item_key.split("#")[0]  # expanded items are keyed "sample#item"


def _assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert [b["key"] for b in got] == [b["key"] for b in want]
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w)
        for field, value in w.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(g[field], value), field
            else:
                assert g[field] == value, field


def _record(ds: ShardDataset) -> list[dict[str, Any]]:
    """Wrap the dataset's raw stream; returns the list every sample it yields lands in."""
    seen: list[dict[str, Any]] = []
    inner = ds.raw_stream

    def raw_stream(owned: set[str] | None = None) -> Iterator[dict[str, Any]]:
        for raw in inner(owned):
            seen.append(raw)
            yield raw

    ds.raw_stream = raw_stream  # type: ignore[method-assign]
    return seen


def _member_bytes(
    shards: Path, keys: set[str] | None = None, tars: list[Path] | None = None
) -> int:
    """Bytes of the members of `keys` (default: all) in `tars` (default: the split's), by
    tarfile's own headers."""
    total = 0
    for path in tars or sorted(shards.glob("train-*.tar")):
        with tarfile.open(path) as tar:
            total += sum(m.size for m in tar if keys is None or m.name.split(".")[0] in keys)
    return total


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-b{c[1]}-s{c[2]}-ws{c[3]}")
def test_worker_batches_equal_the_single_process_ones(shards, case):
    want = list(_loader(shards, case))
    assert want, "the case must yield batches"
    for nw in (2, 3):
        _assert_same_batches(list(_loader(shards, case, nw)), want)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-b{c[1]}-s{c[2]}-ws{c[3]}")
def test_each_worker_reads_exactly_the_samples_of_its_batches(shards, case):
    decoded = {_sample_key(k) for b in _loader(shards, case) for k in b["key"]}
    one = _loader(shards, case).dataset
    list(one.iter_worker(0, 1))
    for nw in (2, 3):
        reads: list[set[str]] = []
        nbytes = 0
        for wid in range(nw):
            ds = _loader(shards, case).dataset
            seen = _record(ds)
            batches = list(ds.iter_worker(wid, nw))
            read = {r["__key__"] for r in seen if set(r) != STUB}
            assert read == {_sample_key(k) for b in batches for k in b["key"]}, (nw, wid)
            assert ds.bytes_read == _member_bytes(shards, read)
            if ds.mix is None:  # a mix may stop once its last batch is complete
                assert len(seen) == ds.plan.count  # stubs keep every position
            reads.append(read)
            nbytes += ds.bytes_read
        assert set().union(*reads) == decoded
        if not case[5].get("expand"):
            # an expanded sample whose items straddle two workers' batches is read by both
            assert sum(len(r) for r in reads) == len(decoded), "workers must be disjoint"
            assert nbytes == _member_bytes(shards, decoded)
    if one.mix is None:  # one worker of one task reads all of the rank's shards, as before
        tars = [path for path, _ in one.plan.shards]
        assert one.bytes_read == _member_bytes(shards, tars=tars) >= nbytes
    else:  # a mix reads only the samples of its batches, whatever the worker count
        assert one.bytes_read == _member_bytes(shards, decoded)


def test_chunks_without_a_batch_keep_the_order_and_are_still_read(sparse):
    """A chunk whose samples lack the task gives no batch; its worker still returns its
    (empty) unit, so the round-robin stays aligned. Its samples are read and decoded (a
    corrupt one would raise as with 0 workers)."""
    for expand in (False, True):
        case = ("vqa", 2, 1, 1, 0, {"expand": expand, "shuffle_buffer": 7})
        want = list(_loader(sparse, case))
        assert want and (expand or len(want) < 12)  # 12 chunks, most without VQA
        for nw in (2, 3):
            _assert_same_batches(list(_loader(sparse, case, nw)), want)
    bsz, start, nw = 2, 1, 3
    for wid in range(nw):
        ds = _loader(sparse, ("vqa", bsz, start, 1, 0, {})).dataset
        seen = _record(ds)
        units = list(ds.worker_units(wid, nw))
        keys = ds.epoch_keys()
        chunks = [keys[p : p + bsz] for p in range(start, len(keys), bsz)][wid::nw]
        assert len(units) == len(chunks) and any(u == [] for u in units)
        assert {r["__key__"] for r in seen if set(r) != STUB} == {k for c in chunks for k in c}


def test_zero_and_one_worker_read_everything_without_an_index(shards, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(shards, bare)
    for p in bare.glob(f"*{INDEX_SUFFIX}"):
        p.unlink()
    clear_index_cache()
    ds = make_loader(bare, "train", "caption", 4, start_sample=6).dataset
    seen = _record(ds)
    batches = list(ds.iter_worker(0, 1))
    assert all(set(r) != STUB for r in seen) and len(seen) == N
    assert ds.bytes_read == _member_bytes(bare, {r["__key__"] for r in seen})
    assert sum(len(b["key"]) for b in batches) == N - 6


def test_shards_without_sidecars_are_indexed_by_a_scan(shards, tmp_path, caplog):
    bare = tmp_path / "bare"
    shutil.copytree(shards, bare)
    for p in bare.glob(f"*{INDEX_SUFFIX}"):
        p.unlink()
    clear_index_cache()
    case = ("caption", 3, 4, 2, 1, {})
    want = list(_loader(shards, case))
    with caplog.at_level(logging.WARNING, logger="setokim.data"):
        _assert_same_batches(list(_loader(bare, case, 2)), want)
        for wid in range(2):
            ds = _loader(bare, case).dataset
            seen = _record(ds)
            keys = {k for b in ds.iter_worker(wid, 2) for k in b["key"]}
            assert {r["__key__"] for r in seen if set(r) != STUB} == keys
    assert "no shard index sidecar" in caplog.text


def _rewrite_tar(path: Path, order: list[int]) -> None:
    """Rewrite a tar with its samples (runs of members sharing a key) in `order`."""
    groups: list[list[tuple[tarfile.TarInfo, bytes]]] = []
    with tarfile.open(path) as tar:
        for m in tar:
            data = tar.extractfile(m).read()
            if not groups or groups[-1][0][0].name.split(".")[0] != m.name.split(".")[0]:
                groups.append([])
            groups[-1].append((m, data))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in order:
            for m, data in groups[i]:
                tar.addfile(m, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def test_keys_that_differ_from_the_index_raise_naming_the_position(shards, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(shards, data)
    shard = data / "train-000003.tar"
    size = shard.stat().st_size
    _rewrite_tar(shard, [0, 1, 3, 2])  # same bytes and size: the sidecar still looks valid
    assert shard.stat().st_size == size
    clear_index_cache()
    for task in ("caption", "mix"):
        ds = make_loader(data, "train", task, 2, shuffle=False, mix_weights=MIX).dataset
        with pytest.raises(DataError, match=r"stream position 14 should be 'train-00000014'"):
            list(ds.iter_worker(1, 2))


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_truncated_shard_fails_the_same_in_every_worker(shards, tmp_path, on_error):
    data = tmp_path / "d"
    shutil.copytree(shards, data)
    shard = data / "train-000002.tar"
    with tarfile.open(shard) as tar:
        m = tar.getmember("train-00000010.png")
    shard.write_bytes(shard.read_bytes()[: m.offset_data + 50])  # cut inside sample 10's image
    clear_index_cache()

    def run(wid: int, nw: int) -> tuple[list[str], str]:
        ds = make_loader(data, "train", "caption", 3, shuffle=False, on_error=on_error).dataset
        try:
            return [k for b in ds.iter_worker(wid, nw) for k in b["key"]], ""
        except DataError as err:
            return [], str(err)

    keys0, err0 = run(0, 1)
    if on_error == "raise":
        assert "train-000002.tar" in err0 and "train-00000009" in err0 and "unreadable" in err0
    else:
        assert keys0 == [f"train-{i:08d}" for i in range(N) if i not in (10, 11)]
    parts = [run(wid, 2) for wid in range(2)]
    assert [e for _, e in parts] == [err0, err0]
    assert sorted(k for ks, _ in parts for k in ks) == sorted(keys0)


def test_the_reader_groups_members_as_webdataset_does(tmp_path):
    """Upper-case extensions, meta members and directories, read by the loader and by
    webdataset's own expander over the same tar: the same sample dicts."""
    names = ["a.JSON", "a.png", "__meta__", "__x.y__", "a.Target.PNG", "b.json", "b.seg.png"]
    path = tmp_path / "train-000000.tar"
    with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = i + 1
            tar.addfile(info, io.BytesIO(bytes([65 + i]) * (i + 1)))
    (tmp_path / MANIFEST_NAME).write_text(
        '{"format": "setok-shards-1", "splits": {"train": {"num_samples": 2, "shards": '
        '[{"name": "train-000000.tar", "num_samples": 2}]}}}'
    )
    ds = ShardDataset(DataConfig(shard_dir=str(tmp_path), split="train", task="caption"))
    ours = list(ds._read_shard(path, 2))
    theirs = list(group_by_keys(tar_file_expander(url_opener([{"url": str(path)}]))))
    for raw in theirs:
        raw["__url__"] = path.name
    assert ours == theirs and [r["__key__"] for r in ours] == ["a", "b"]
    assert ds.bytes_read == sum(len(v) for r in ours for k, v in r.items() if k not in STUB)
    stubs = list(ds._read_shard(path, 2, owned={"b"}))
    assert stubs[0] == {"__key__": "a", "__url__": path.name} and stubs[1] == theirs[1]
