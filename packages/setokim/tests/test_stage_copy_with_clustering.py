"""`copy_with_clustering`: the same SeTok weights under another clustering, written whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from setok_tokenizer import SeTok
from setokim.stages.common import copy_with_clustering, tiny_tokenizer

CONFIGS = (("tokenizer/setok_config.json", ()),)


def test_copy_clusters_every_patch_with_the_same_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    setok = SeTok.from_config(tiny_tokenizer()).eval()
    setok.save_pretrained(tmp_path / "export" / "tokenizer")
    out = copy_with_clustering(
        tmp_path / "export", tmp_path / "patch", {"mechanism": "patch"}, CONFIGS
    )
    patch = SeTok.from_pretrained(out / "tokenizer").eval()
    assert patch.cfg.clustering.mechanism == "patch"
    assert patch.cfg.clustering.max_clusters == setok.cfg.clustering.max_clusters  # the rest kept
    for (name, a), (_, b) in zip(
        setok.state_dict().items(), patch.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    images = torch.rand(2, 3, setok.cfg.encoder.image_size, setok.cfg.encoder.image_size)
    with torch.no_grad():
        grouped, per_patch = setok.tokenize(images), patch.tokenize(images)
    grid = per_patch.masks.shape[-2] * per_patch.masks.shape[-1]
    assert per_patch.token_mask.sum(1).tolist() == [grid, grid]
    assert int(grouped.token_mask.sum(1).max()) <= setok.cfg.clustering.max_clusters < grid
    # the source is untouched, and a finished copy is kept as it is (a resumed run)
    src = json.loads((tmp_path / "export" / "tokenizer" / "setok_config.json").read_text())
    assert src["clustering"]["mechanism"] == "dynamic"
    again = copy_with_clustering(tmp_path / "export", out, {"mechanism": "fixed"}, CONFIGS)
    assert SeTok.from_pretrained(again / "tokenizer").cfg.clustering.mechanism == "patch"


def test_a_missing_config_names_the_file_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "export").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer/setok_config.json"):
        copy_with_clustering(
            tmp_path / "export", tmp_path / "patch", {"mechanism": "patch"}, CONFIGS
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
