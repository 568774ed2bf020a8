"""Merging shard dirs: Shapes World (two seeds) + a LLaVA conversion into one training split."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from setokim.data.check import check_shards
from setokim.data.generate import generate_dataset
from setokim.data.loader import make_loader
from setokim.data.merge import MergeSource, merge_datasets
from setokim.data.shards import read_manifest


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (the sources must not change)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def split_keys(shard_dir: Path, split: str) -> list[str]:
    """Every sample key of a split, read straight from the tars named in the manifest."""
    keys = []
    for s in read_manifest(shard_dir)["splits"][split]["shards"]:
        with tarfile.open(shard_dir / s["name"]) as tar:
            for name in tar.getnames():
                if name.endswith(".json"):
                    keys.append(name[: -len(".json")])
    return keys


def loader_keys(shard_dir: Path, split: str) -> list[str]:
    """Keys the training loader yields for one epoch (chat: every sample here has one)."""
    loader = make_loader(shard_dir, split, "chat", 4, image_size=32, seed=3)
    return [k for batch in loader for k in batch["key"]]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, mixed_sources) -> Path:
    return mixed_sources(tmp_path_factory.mktemp("sources"), 6)


@pytest.mark.parametrize("link", ["hard", "copy", "symlink"])
def test_merge_is_the_union_and_sources_stay(sources, tmp_path, link):
    before = tree_hashes(sources)
    srcs = [
        MergeSource(sources / "sw0", "train"),
        MergeSource(sources / "sw1", "train", key_prefix="seed1-"),
        MergeSource(sources / "llava", "train"),
        MergeSource(sources / "sw0", "val", name="sw0val"),
    ]
    out = merge_datasets(srcs, tmp_path / "merged", link=link, progress=False)
    assert tree_hashes(sources) == before
    assert check_shards(out) == []

    expected = (
        split_keys(sources / "sw0", "train")
        + ["seed1-" + k for k in split_keys(sources / "sw1", "train")]
        + split_keys(sources / "llava", "train")
        + split_keys(sources / "sw0", "val")
    )
    assert len(expected) == 6 + 6 + 3 + 2 == len(set(expected))
    got = loader_keys(out, "train")
    assert sorted(got) == sorted(expected) and len(got) == len(set(got))

    m = read_manifest(out)
    assert list(m["splits"]) == ["train"] and m["splits"]["train"]["num_samples"] == 17
    names = [s["name"] for s in m["splits"]["train"]["shards"]]
    assert len(set(names)) == len(names) and all(n.startswith("train-") for n in names)
    info = m["info"]
    assert [(s["split"], s["num_samples"]) for s in info["sources"]] == [
        ("train", 6), ("train", 6), ("train", 3), ("val", 2)
    ]  # fmt: skip
    assert [s["version"] for s in info["sources"]] == [
        read_manifest(sources / d)["version"] for d in ("sw0", "sw1", "llava", "sw0")
    ]
    assert m["version"] not in {s["version"] for s in info["sources"]}
    assert "image_size" not in info  # the LLaVA source keeps its native size

    linked = out / names[0]
    original = (
        sources / "sw0" / read_manifest(sources / "sw0")["splits"]["train"]["shards"][0]["name"]
    )
    assert linked.read_bytes() == original.read_bytes()
    assert linked.is_symlink() == (link == "symlink")
    assert (linked.stat().st_ino == original.stat().st_ino) == (link != "copy")

    # the prefixed source: annotation keys follow the tar keys, images stay byte-identical
    rekeyed = [n for n in names if "-01-" in n]
    with tarfile.open(out / rekeyed[0]) as tar:
        ann = json.loads(tar.extractfile(tar.getmember("seed1-train-00000000.json")).read())
        png = tar.extractfile(tar.getmember("seed1-train-00000000.png")).read()
    with tarfile.open(sources / "sw1" / "train-000000.tar") as tar:
        assert png == tar.extractfile(tar.getmember("train-00000000.png")).read()
    assert ann["key"] == "seed1-train-00000000"

    # the same inputs give the same data version
    again = merge_datasets(srcs, tmp_path / "again", link="copy", progress=False)
    assert read_manifest(again)["version"] == m["version"]


def test_key_collision_names_both_sources_and_the_key(sources, tmp_path):
    srcs = [MergeSource(sources / "sw0"), MergeSource(sources / "sw1")]
    with pytest.raises(ValueError, match="train-00000000") as err:
        merge_datasets(srcs, tmp_path / "m", progress=False)
    assert str(sources / "sw0") in str(err.value) and str(sources / "sw1") in str(err.value)
    assert not (tmp_path / "m").exists()


def test_existing_out_dir_and_bad_arguments(sources, tmp_path):
    out = tmp_path / "m"
    merge_datasets([MergeSource(sources / "llava")], out, progress=False)
    first = tree_hashes(out)
    with pytest.raises(FileExistsError, match="out_dir"):
        merge_datasets([MergeSource(sources / "sw0")], out, progress=False)
    assert tree_hashes(out) == first
    merge_datasets([MergeSource(sources / "sw0")], out, overwrite=True, progress=False)
    assert sorted(split_keys(out, "train")) == sorted(split_keys(sources / "sw0", "train"))
    with pytest.raises(ValueError, match="no split 'test2'"):
        merge_datasets([MergeSource(sources / "sw0", "test2")], tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="link"):
        merge_datasets([MergeSource(sources / "sw0")], tmp_path / "x", link="move")
    with pytest.raises(ValueError, match="key_prefix"):
        merge_datasets([MergeSource(sources / "sw0", key_prefix="a.b")], tmp_path / "x")
    with pytest.raises(ValueError, match="share the name"):
        merge_datasets([MergeSource(sources / "sw0", name="a"), MergeSource(sources / "sw1", "val", name="a")], tmp_path / "x")  # fmt: skip
    with pytest.raises(FileNotFoundError, match="manifest"):
        merge_datasets([MergeSource(tmp_path / "nowhere")], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_failure_mid_merge_leaves_no_out_dir(sources, tmp_path):
    """A source whose annotation is garbage (same size, so only the rewrite notices) fails
    after the first source's shards are already placed: nothing appears, the old dir stays."""
    bad = tmp_path / "bad"
    generate_dataset(bad, train=3, val=0, test=0, image_size=32, seed=5, samples_per_shard=4)
    shard = bad / "train-000000.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmember("train-00000002.json")
    data = bytearray(shard.read_bytes())
    data[member.offset_data : member.offset_data + member.size] = b"{" * member.size
    shard.write_bytes(bytes(data))
    srcs = [MergeSource(sources / "llava"), MergeSource(bad, key_prefix="b-")]
    with pytest.raises(json.JSONDecodeError):
        merge_datasets(srcs, tmp_path / "m", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
    merge_datasets([MergeSource(sources / "llava")], tmp_path / "m", progress=False)
    kept = tree_hashes(tmp_path / "m")
    with pytest.raises(json.JSONDecodeError):
        merge_datasets(srcs, tmp_path / "m", overwrite=True, progress=False)
    assert tree_hashes(tmp_path / "m") == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "m"]


def test_cli(sources, tmp_path, capsys, script):
    cli = script("tools/data/merge_shards.py")
    argv = [str(tmp_path / "m"), "--source", str(sources / "llava"),
            "--source", f"{sources / 'sw1'}:val:v-", "--link", "copy", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "train: 5 samples" in capsys.readouterr().out
    assert check_shards(tmp_path / "m") == []
    assert sorted(split_keys(tmp_path / "m", "train")) == sorted(
        split_keys(sources / "llava", "train") + ["v-val-00000000", "v-val-00000001"]
    )
    assert MergeSource.parse("d") == MergeSource("d", "train")
    assert MergeSource.parse("d:val:p-") == MergeSource("d", "val", key_prefix="p-")
    with pytest.raises(ValueError, match="DIR"):
        MergeSource.parse("d::p")
