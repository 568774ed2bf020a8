"""The data CLIs in tools/: --help works, and the Shapes World CLI writes a checked dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[3] / "tools"
# Every script of tools/data is a CLI with a --help; what they share is library code in
# setokim.data (eval_common), imported like any package module.
CLIS = [
    "make_shapes_world.py",
    "check_shards.py",
    *(f"data/{p.name}" for p in sorted((TOOLS / "data").glob("*.py"))),
]


def test_the_exporter_is_listed_as_a_cli():
    assert "data/eval_export.py" in CLIS


@pytest.mark.parametrize("rel", CLIS)
def test_help(rel, capsys, script):
    with pytest.raises(SystemExit) as exit_info:
        script(f"tools/{rel}").main(["--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_make_then_check(tmp_path, script):
    out = tmp_path / "sw"
    argv = [
        "--out",
        str(out),
        "--train",
        "6",
        "--val",
        "2",
        "--test",
        "2",
        "--samples-per-shard",
        "4",
        "--no-progress",
    ]
    assert script("tools/make_shapes_world.py").main(argv) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "test-000000.tar",
        "train-000000.tar",
        "train-000001.tar",
        "val-000000.tar",
    ]
    assert script("tools/check_shards.py").main([str(out), "--no-progress"]) == 0
