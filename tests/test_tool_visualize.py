"""tools/visualize_tokens.py on a generated PNG: output size and one colour per token."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TOOL = Path(__file__).resolve().parents[1] / "tools" / "visualize_tokens.py"


def _blocks_png(path: Path) -> None:
    """Four flat colour blocks plus mild noise, 120x90."""
    rng = np.random.default_rng(0)
    img = np.zeros((90, 120, 3), dtype=np.float64)
    img[:45, :60] = (220, 30, 30)
    img[:45, 60:] = (30, 200, 40)
    img[45:, :60] = (20, 40, 230)
    img[45:, 60:] = (240, 230, 40)
    img += rng.normal(0, 6, img.shape)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)


def test_tool_writes_one_colour_per_token(tmp_path, capsys, script) -> None:
    tool = script("tools/visualize_tokens.py")
    src = tmp_path / "blocks.png"
    _blocks_png(src)
    out = tmp_path / "viz" / "tokens.png"
    panel = 96
    assert tool.main([str(src), str(src), "--out", str(out), "--panel-size", str(panel)]) == 0
    stdout = capsys.readouterr().out
    assert "tiny random SeTok" in stdout
    assert stdout.count("untrained features") == 3  # the notice and both titles
    summary = json.loads(stdout.strip().splitlines()[-1])
    counts = summary["num_tokens"]
    assert len(counts) == 2 and all(1 <= n <= 32 for n in counts)
    assert counts[0] == counts[1]  # same image, same seeded model
    assert not list(out.parent.glob(".*tmp"))  # atomic write left no temp file

    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert sheet.shape == (2 * (panel + tool.TITLE_HEIGHT), 2 * panel, 3)
    for row, n in enumerate(counts):
        top = row * (panel + tool.TITLE_HEIGHT) + tool.TITLE_HEIGHT
        solid = sheet[top : top + panel, panel:].reshape(-1, 3)
        colours = {tuple(c) for c in np.unique(solid, axis=0)}
        assert len(colours) == n
        assert colours == {tuple(c) for c in tool.palette(n)}


def test_palette_is_distinct_and_avoids_black_and_white(script) -> None:
    tool = script("tools/visualize_tokens.py")
    colours = tool.palette(300)
    assert len({tuple(c) for c in colours}) == 300
    assert not any(tuple(c) in {(0, 0, 0), (255, 255, 255)} for c in colours)


def test_tool_cli_help_and_missing_image(tmp_path, capsys, script) -> None:
    done = subprocess.run(
        [sys.executable, str(TOOL), "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "--checkpoint" in done.stdout
    tool = script("tools/visualize_tokens.py")
    with pytest.raises(FileNotFoundError, match="IMAGE not found"):
        tool.main([str(tmp_path / "missing.png"), "--out", str(tmp_path / "o.png")])
    with pytest.raises(SystemExit):
        tool.main(["--out", str(tmp_path / "o.png")])
    assert "IMAGE or --demo" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_trains_and_draws_held_out_scenes(tmp_path, capsys, script) -> None:
    """--demo trains on the spot; its counts track the scenes' regions better than untrained."""
    tool = script("tools/visualize_tokens.py")
    out = tmp_path / "demo.png"
    assert tool.main(["--demo", "--demo-steps", "150", "--out", str(out), "--panel-size", "64"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    titles = [line for line in lines if line.startswith("held-out scene")]
    assert len(titles) == tool.DEMO_SCENES and not any("untrained" in t for t in titles)
    trained = [int(t.split(": ")[1].split()[0]) for t in titles]
    regions = [int(t.split("(")[1].split()[0]) for t in titles]
    err = sum(abs(a - b) for a, b in zip(trained, regions, strict=True)) / len(titles)
    assert err <= 2.0, (trained, regions)
    sheet = Image.open(out)
    assert sheet.size == (2 * 64, tool.DEMO_SCENES * (64 + tool.TITLE_HEIGHT))
