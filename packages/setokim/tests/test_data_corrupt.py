"""Corrupt and truncated shards: raise naming shard and key, or skip, count and log."""

from __future__ import annotations

import logging
import shutil
import tarfile

import pytest

from setokim.data.check import check_shards
from setokim.data.decode import DataError
from setokim.data.generate import generate_dataset
from setokim.data.loader import make_loader


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    generate_dataset(out, 12, 0, 0, 64, seed=0, samples_per_shard=4)  # 3 train shards
    return out


@pytest.fixture
def data(clean, tmp_path):
    shutil.copytree(clean, tmp_path / "d")
    return tmp_path / "d"


def member_offset(path, name):
    with tarfile.open(path) as tar:
        m = tar.getmember(name)
        return m.offset_data, m.size


def keys(loader):
    return [k for b in loader for k in b["key"]]


def test_clean_data_checks_ok(clean):
    assert check_shards(clean) == []


def test_flipped_bytes_in_a_sample(data, caplog):
    shard = data / "train-000001.tar"
    for name in ("train-00000005.json", "train-00000006.png"):
        off, size = member_offset(shard, name)
        raw = bytearray(shard.read_bytes())
        for k in range(off + size // 3, off + size // 3 + 8):
            raw[k] ^= 0xFF
        shard.write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:
        list(make_loader(data, "train", "caption", 2, shuffle=False))
    assert "train-000001.tar" in str(err.value) and "train-00000005" in str(err.value)
    loader = make_loader(data, "train", "caption", 2, shuffle=False, on_error="skip", even=False)
    with caplog.at_level(logging.WARNING, logger="setokim.data"):
        got = keys(loader)
    assert loader.skipped == 2 and len(got) == 10
    assert "train-00000005" not in got and "train-00000006" not in got
    assert sum("train-00000006" in r.getMessage() for r in caplog.records) == 1
    problems = check_shards(data)
    assert {p.key for p in problems if p.key} >= {"train-00000005", "train-00000006"}
    assert any("sha256" in p.reason for p in problems)


def test_truncated_shard(data, caplog):
    shard = data / "train-000002.tar"
    off, _ = member_offset(shard, "train-00000009.png")
    shard.write_bytes(shard.read_bytes()[: off + 100])  # cut inside sample 9's image
    with pytest.raises(DataError) as err:
        list(make_loader(data, "train", "vqa", 4, shuffle=False))
    assert "train-000002.tar" in str(err.value) and "train-00000008" in str(err.value)
    loader = make_loader(data, "train", "vqa", 4, shuffle=False, on_error="skip", even=False)
    with caplog.at_level(logging.WARNING, logger="setokim.data"):
        got = keys(loader)
    assert got == [f"train-{i:08d}" for i in range(9)]
    assert loader.skipped == 1 and "train-000002.tar" in caplog.text
    problems = check_shards(data)
    assert any(p.shard == "train-000002.tar" and "unreadable" in p.reason for p in problems)


def test_shard_cut_at_a_member_boundary_is_not_silent(data):
    shard = data / "train-000000.tar"
    with tarfile.open(shard) as tar:
        cut = tar.getmember("train-00000002.json").offset  # header of sample 2
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(DataError, match="manifest says 4"):
        list(make_loader(data, "train", "caption", 4, shuffle=False))


def test_check_shards_cli_exit_codes(clean, data, capsys, script):
    cli = script("tools/check_shards.py")
    assert cli.main([str(clean), "--no-progress"]) == 0
    (data / "train-000001.tar").unlink()
    assert cli.main([str(data), "--no-progress"]) == 1
    assert "train-000001.tar: missing" in capsys.readouterr().out
