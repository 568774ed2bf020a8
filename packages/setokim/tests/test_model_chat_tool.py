"""tools/chat.py end to end with the random tiny model (slow: a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_chat_tool_answers_and_writes_images(tmp_path):
    img = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(img)
    tool = [sys.executable, str(ROOT / "tools" / "chat.py"), "--tiny", "--max-new-tokens", "4"]
    out = subprocess.run(
        [*tool, "--image", str(img), "--prompt", "what is it?"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "random tiny" in out.stderr
    png = tmp_path / "gen.png"
    out = subprocess.run(
        [
            *tool,
            "--mode",
            "generate",
            "--prompt",
            "a star",
            "--decoder-steps",
            "2",
            "--out",
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    with Image.open(png) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    bad = subprocess.run(
        [*tool, "--mode", "ground", "--prompt", "x"], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode != 0 and "needs exactly one --image" in bad.stderr
