"""Shard index sidecars: written with the shards, equal to a tar scan, ignored when stale,
carried by merges, verified by check_shards and rebuilt by tools/data/index_shards.py."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest

from setokim.data import mix_plan
from setokim.data.check import check_shards
from setokim.data.loader import make_loader
from setokim.data.merge import MergeSource, merge_datasets
from setokim.data.schema import TASKS, SampleAnnotation
from setokim.data.shard_index import INDEX_SUFFIX, index_name
from setokim.data.shards import ShardWriter, read_manifest, write_manifest

WEIGHTS = {"caption": 1.0, "vqa": 1.0, "rec": 1.0, "edit": 1.0}


def shard_paths(shard_dir: Path) -> list[Path]:
    m = read_manifest(shard_dir)
    return [shard_dir / s["name"] for body in m["splits"].values() for s in body["shards"]]


def sidecars(shard_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(shard_dir.glob(f"*{INDEX_SUFFIX}"))}


def truth(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """Keys and per-task counts parsed with the full schema (independent of the index code)."""
    out = []
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            if m.name.endswith(".json"):
                ann = SampleAnnotation.from_json(tar.extractfile(m).read())
                out.append((m.name[: -len(".json")], tuple(ann.num_items(t) for t in TASKS)))
    return out


@pytest.fixture
def fresh(monkeypatch):
    """An empty per-process index cache and log memory; counts tar scans."""
    mix_plan.clear_index_cache()
    monkeypatch.setattr(mix_plan, "_LOGGED", set())
    calls: list[str] = []
    real = mix_plan.scan_shard

    def spy(path: Path) -> list[mix_plan.IndexEntry]:
        calls.append(path.name)
        return real(path)

    monkeypatch.setattr(mix_plan, "scan_shard", spy)
    yield calls
    mix_plan.clear_index_cache()


@pytest.fixture(scope="module")
def data(tmp_path_factory, mixed_sources) -> Path:
    root = mixed_sources(tmp_path_factory.mktemp("index"), 12)
    # a shard whose samples have a broken annotation and none at all (error rows)
    odd = root / "odd"
    with ShardWriter(odd, "train", samples_per_shard=8) as w:
        w.write("a", {"png": b"x", "json": b'{"captions": ["c"], "vqa": [1, 2]}'})
        w.write("b", {"png": b"x", "json": b"{not json"})
        w.write("c", {"png": b"x"})
        w.write("d", {"png": b"x", "JSON": b"[1]"})
    write_manifest(odd, {"train": w.shards}, {"source": "odd"})
    return root


@pytest.mark.parametrize("name", ["sw0", "llava", "odd"])
def test_sidecars_are_written_and_equal_the_tar_scan(data, fresh, name):
    paths = shard_paths(data / name)
    assert sorted(sidecars(data / name)) == sorted(index_name(p.name) for p in paths)
    from_side = [mix_plan.index_shard(p) for p in paths]
    assert fresh == [], "a matching sidecar must spare the tar scan"
    assert from_side == [mix_plan.scan_shard(p) for p in paths]
    if name != "odd":
        got = [(e.key, e.items) for es in from_side for e in es]
        assert got == [t for p in paths for t in truth(p)]
        assert any(any(e.items) for es in from_side for e in es)
    else:
        (entries,) = from_side
        assert [e.key for e in entries] == ["a", "b", "c", "d"]
        assert entries[0].items == tuple(
            {"caption": 1, "vqa": 2}.get(t, 0) for t in TASKS
        )  # fmt: skip
        assert [e.items for e in entries[1:]] == [None] * 3
        assert "cannot decode" in entries[1].error and entries[2].error == "no .json annotation"
        assert "not a JSON object" in entries[3].error


def test_mix_batches_are_the_same_without_sidecars(data, tmp_path, fresh, caplog):
    bare = tmp_path / "bare"
    shutil.copytree(data / "sw0", bare)
    for p in bare.glob(f"*{INDEX_SUFFIX}"):
        p.unlink()

    def epoch(d: Path, rank: int) -> list[tuple[str, list[str], bytes]]:
        ld = make_loader(d, "train", "mix", 3, rank=rank, world_size=2, expand=True,
                         mix_weights=WEIGHTS, shuffle_buffer=4, seed=2)  # fmt: skip
        return [(b["task"], b["key"], b["pixels"].numpy().tobytes()) for b in ld]

    with caplog.at_level(logging.WARNING, logger="setokim.data"):
        with_side = [epoch(data / "sw0", r) for r in range(2)]
        assert fresh == [] and "no shard index sidecar" not in caplog.text
        without = [epoch(bare, r) for r in range(2)]
    assert sorted(set(fresh)) == sorted(p.name for p in bare.glob("train-*.tar"))
    assert with_side == without and all(len(b) > 1 for b in with_side)
    assert caplog.text.count("no shard index sidecar") == 1  # once per process and dir


def _rewrite_member(shard: Path, name: str, data: bytes) -> None:
    with tarfile.open(shard) as tar:
        m = tar.getmember(name)
    raw = bytearray(shard.read_bytes())
    assert len(data) == m.size
    raw[m.offset_data : m.offset_data + m.size] = data
    shard.write_bytes(bytes(raw))


def test_a_stale_sidecar_is_not_used(data, tmp_path, fresh, caplog):
    # (a) the shards re-generated with another seed, an old sidecar left behind
    regen = tmp_path / "regen"
    shutil.copytree(data / "sw1", regen)
    shard = regen / "train-000000.tar"
    shutil.copyfile(data / "sw0" / index_name(shard.name), regen / index_name(shard.name))
    old = mix_plan.scan_shard(data / "sw0" / shard.name)
    fresh.clear()
    with caplog.at_level(logging.WARNING, logger="setokim.data"):
        got = mix_plan.index_shard(shard)
    assert fresh == [shard.name] and "stale" in caplog.text and "sha256" in caplog.text
    assert got == mix_plan.scan_shard(shard) and [e.items for e in got] != [e.items for e in old]

    # (b) bytes changed: one annotation rewritten (same size), the manifest updated with it
    edit = tmp_path / "edit"
    shutil.copytree(data / "sw0", edit)
    shard = edit / "train-000001.tar"
    key = mix_plan.scan_shard(shard)[0].key
    with tarfile.open(shard) as tar:
        size = tar.getmember(f"{key}.json").size
    blank = json.dumps({"key": key, "captions": []}).encode()
    _rewrite_member(shard, f"{key}.json", blank + b" " * (size - len(blank)))
    m = json.loads((edit / "manifest.json").read_text())
    entry = next(s for s in m["splits"]["train"]["shards"] if s["name"] == shard.name)
    entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (edit / "manifest.json").write_text(json.dumps(m))
    fresh.clear()
    got = mix_plan.index_shard(shard)
    assert fresh == [shard.name] and got[0].items == (0,) * len(TASKS)

    # (c) the tar grown in place, the manifest not updated: the size gives it away
    shard = edit / "train-000002.tar"
    before = mix_plan.scan_shard(shard)
    shard.write_bytes(shard.read_bytes() + b"\0" * 1024)
    fresh.clear()
    assert mix_plan.index_shard(shard) == before and fresh == [shard.name]

    # a writer without sidecars removes the old ones it would leave stale
    ShardWriter(regen, "train", 4, index=False).close()  # nothing written: nothing removed
    with ShardWriter(regen, "train", 4, index=False) as w:
        w.write("x", {"png": b"p", "json": b"{}"})
    assert not (regen / index_name("train-000000.tar")).exists()


@pytest.mark.parametrize("link", ["hard", "symlink"])
def test_merge_carries_sidecars_and_prefixed_sources_get_fresh_ones(data, tmp_path, fresh, link):
    stale = tmp_path / "stale"
    shutil.copytree(data / "llava", stale)
    first = read_manifest(stale)["splits"]["train"]["shards"][0]["name"]
    shutil.copyfile(data / "sw0" / index_name("train-000000.tar"), stale / index_name(first))
    srcs = [
        MergeSource(data / "sw0", "train"),
        MergeSource(data / "sw1", "train", key_prefix="s1-"),
        MergeSource(stale, "train", name="llava"),
    ]
    out = merge_datasets(srcs, tmp_path / "m", link=link, progress=False)
    names = [s["name"] for s in read_manifest(out)["splits"]["train"]["shards"]]
    have = set(sidecars(out))
    assert all(index_name(n) in have for n in names if "-llava-000000" not in n)
    assert index_name(next(n for n in names if "-llava-000000" in n)) not in have  # stale: left
    linked = out / index_name(names[0])
    source = data / "sw0" / index_name("train-000000.tar")
    assert linked.read_bytes() == source.read_bytes()
    assert linked.is_symlink() == (link == "symlink")
    assert linked.stat().st_ino == source.stat().st_ino
    fresh.clear()
    merged = {n: mix_plan.index_shard(out / n) for n in names}
    assert sorted(fresh) == sorted(n for n in names if "-llava-000000" in n)
    assert merged == {n: mix_plan.scan_shard(out / n) for n in names}
    prefixed = [e.key for n in names if "-01-" in n for e in merged[n]]
    assert len(prefixed) == 12 and all(k.startswith("s1-train-") for k in prefixed)
    assert check_shards(out) == []


def test_check_shards_flags_a_tampered_sidecar(data, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(data / "sw0", d)
    side = d / index_name("train-000001.tar")
    body = json.loads(side.read_text())
    key, counts = body["samples"][2]
    body["samples"][2] = [key, [c + 1 for c in counts]]
    side.write_text(json.dumps(body))
    problems = check_shards(d)
    assert len(problems) == 1
    (p,) = problems
    assert p.shard == "train-000001.tar" and p.key == key and "index sidecar" in p.reason
    side.write_text("{")
    (p,) = check_shards(d)
    assert p.shard == "train-000001.tar" and "malformed" in p.reason
    side.unlink()
    assert check_shards(d) == []  # no sidecar is fine
    body["samples"][2] = [key, counts]
    body["sha256"] = "0" * 64
    side.write_text(json.dumps(body))
    (p,) = check_shards(d)
    assert "stale" in p.reason and "sha256" in p.reason


def test_index_shards_tool_recreates_the_sidecars(data, tmp_path, capsys, script):
    tool = script("tools/data/index_shards.py")
    for name in ("sw0", "llava"):
        d = tmp_path / name
        shutil.copytree(data / name, d)
        original = sidecars(d)
        assert original
        for p in d.glob(f"*{INDEX_SUFFIX}"):
            p.unlink()
        assert tool.main([str(d), "--no-progress"]) == 0
        assert sidecars(d) == original
        assert f"{len(original)} sidecar(s) written, 0 already" in capsys.readouterr().out
        assert tool.main([str(d), "--no-progress", "--split", "train"]) == 0
        assert "0 sidecar(s) written" in capsys.readouterr().out
    d = tmp_path / "sw0"
    (d / index_name("train-000000.tar")).unlink()
    (d / "train-000000.tar").write_bytes((d / "train-000000.tar").read_bytes()[:-1024])
    assert tool.main([str(d), "--no-progress", "--force"]) == 1
    assert "train-000000.tar: sha256" in capsys.readouterr().out
    assert not (d / index_name("train-000000.tar")).exists()
    with pytest.raises(ValueError, match="nope"):
        tool.index_shard_dir(d, ["nope"], progress=False)
