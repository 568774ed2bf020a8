"""tools/reconstruct.py on an exported Stage I model and a generated PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from setokim.stages.stage1 import build, export_parts

# 16 px pixel-space decoder, cross-attention at 8x8 (test_stage1_stage.py uses the same)
TINY_DECODER = {
    "diffusion": {
        "image_size": 16,
        "unet": {
            "sample_size": 16, "in_channels": 3, "out_channels": 3,
            "block_out_channels": [16, 32],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "cross_attention_dim": 32, "layers_per_block": 1, "norm_num_groups": 8,
            "attention_head_dim": 8,
        },
        "mapper": {"num_queries": 4, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                   "intermediate_size": 64},
    },
    "mask": {"hidden_dim": 32, "num_layers": 1, "num_heads": 2, "mask_scale": 2},
}  # fmt: skip



def test_reconstruct_writes_originals_above_reconstructions(tmp_path: Path, script) -> None:
    threads = torch.get_num_threads()
    stage = build(
        {
            "tokenizer": {"encoder": {"image_size": 32}, "clustering": {"max_clusters": 4}},
            "decoder": TINY_DECODER,
            "data": {"shard_dir": str(tmp_path / "unused")},
            "cpu_threads": 1,
        }
    )
    export_parts(stage.build_model(), tmp_path / "parts")
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        arr = rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)
        arr[5:20, 5:20] = (255, 0, 0) if i == 0 else (0, 0, 255)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(arr).save(path)
        images.append(str(path))
    out = tmp_path / "out" / "recon.png"
    tool = script("tools/reconstruct.py")
    try:
        code = tool.main([str(tmp_path / "parts"), *images, "--out", str(out), "--steps", "2"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    grid = np.asarray(Image.open(out).convert("RGB"))
    assert grid.shape == (64, 64, 3)  # 2 rows x 2 columns of 32 px cells
    top_left = grid[:32, :32].astype(int)
    assert top_left[8:14, 8:14, 0].mean() > 150 and top_left[8:14, 8:14, 2].mean() < 100
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temp file

    with pytest.raises(FileNotFoundError, match="CKPT"):
        tool.main([str(tmp_path / "missing"), *images, "--out", str(out)])
    with pytest.raises(ValueError, match=r"IMAGES\[0\]"):
        tool.main([str(tmp_path / "parts"), str(tmp_path / "parts" / "diffusion" / "config.json"),
                   "--out", str(out)])  # fmt: skip
