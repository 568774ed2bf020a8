"""tools/chat.py end to end with the random tiny model (slow: a fresh interpreter)."""

from __future__ import annotations

import io
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


class _SilentModel:
    """A model whose every reply is empty (what an untrained SeTokIM often returns)."""

    def chat(self, history, gen):
        return ""


def test_empty_answer_is_named_and_a_bad_image_does_not_end_the_chat(
    tmp_path, monkeypatch, capsys, script
):
    chat = script("tools/chat.py")
    assert chat.show_answer("red") == "red"
    assert chat.show_answer("") == chat.show_answer("  ") == chat.EMPTY_ANSWER
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    lines = ["/image missing.png", "/image", f"/image {not_image}", "How many shapes?", "/quit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    args = chat.parse_args(["--tiny"])
    chat.interactive(_SilentModel(), args, 16, None)
    out, err = capsys.readouterr()
    assert "image missing.png: file not found; the chat goes on" in err
    assert "/image needs a path" in err
    assert "not a readable image" in err
    assert out.strip() == chat.EMPTY_ANSWER  # the question after the errors got its reply


def test_decoder_settings_default_to_the_checkpoint_decoder(script):
    from types import SimpleNamespace

    from setok_decoders.config import DiffusionDecoderConfig

    chat = script("tools/chat.py")
    model = SimpleNamespace(
        image_decoder=SimpleNamespace(
            config=DiffusionDecoderConfig(num_inference_steps=7, guidance_scale=2.5)
        )
    )
    gen = chat.generation_config(chat.parse_args(["--tiny"]), model)
    assert (gen.decoder_steps, gen.guidance_scale) == (7, 2.5)
    args = chat.parse_args(["--tiny", "--decoder-steps", "3", "--guidance-scale", "1"])
    gen = chat.generation_config(args, model)
    assert (gen.decoder_steps, gen.guidance_scale) == (3, 1.0)


def test_panel_prompts_and_dependence_report(script):
    import torch

    chat = script("tools/chat.py")
    prompts = chat.panel_prompts(["generate=a star", "generate=a moon"])
    assert prompts["generate"] == ["a star", "a moon"]
    assert prompts["edit"] == chat.PANEL_PROMPTS["edit"]
    with pytest.raises(SystemExit, match="MODE=TEXT"):
        chat.panel_prompts(["draw=a star"])
    mask = np.zeros((8, 8), dtype=bool)
    mask[:4] = True
    row = {"answer": "red", "box": [0.0, 0.0, 4.0, 4.0], "mask": mask,
           "generated": torch.zeros(3, 4, 4), "edited": torch.ones(3, 4, 4)}  # fmt: skip
    same = chat.dependence(row, row)
    assert same == {"same_answer": True, "box_iou": 1.0, "mask_iou": 1.0,
                    "generated_l1": 0.0, "edited_l1": 0.0}  # fmt: skip
    other = {**row, "answer": "blue", "box": [2.0, 0.0, 6.0, 4.0], "mask": ~mask,
             "generated": torch.full((3, 4, 4), 0.5)}  # fmt: skip
    diff = chat.dependence(row, other)
    assert diff["same_answer"] is False and diff["mask_iou"] == 0.0
    assert diff["box_iou"] == pytest.approx(8 / 24) and diff["generated_l1"] == 0.5


def _scene(path: Path, colour: tuple[int, int, int], box: tuple[int, int, int, int]) -> Path:
    img = np.full((64, 64, 3), 128, dtype=np.uint8)
    img[box[1] : box[3], box[0] : box[2]] = colour
    Image.fromarray(img).save(path)
    return path


@pytest.mark.slow
def test_panel_runs_every_mode_on_each_image(tmp_path, capsys, script):
    chat = script("tools/chat.py")
    a = _scene(tmp_path / "a.png", (220, 30, 30), (8, 8, 40, 40))
    b = _scene(tmp_path / "b.png", (30, 40, 220), (20, 24, 60, 60))
    out = tmp_path / "panel.png"
    argv = ["--tiny", "--image", str(a), "--image", str(b), "--save-panel", str(out),
            "--max-new-tokens", "4", "--decoder-steps", "2"]  # fmt: skip
    assert chat.main(argv) == 0
    with Image.open(out) as im:
        assert im.size == (6 * chat.PANEL_CELL, 14 + 2 * chat.PANEL_CELL)
    report = capsys.readouterr().out
    assert "row 0 a.png" in report and "row 1 b.png" in report
    # the random tiny model's segment follows the image (a different mask per scene)
    iou = float(report.split("mask_iou ")[1].split(",")[0])
    assert iou < 0.9
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(SystemExit, match="not a readable image"):
        chat.main(["--tiny", "--image", str(text), "--save-panel", str(out)])
