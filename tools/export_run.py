"""Export the trained model of a launcher run directory (what the next stage loads).

    uv run python tools/export_run.py RUN_DIR --out EXPORT_DIR [--checkpoint STEP_DIR]

RUN_DIR is a run directory written by `experiments/launch.py` (it holds `config.yaml` and
`checkpoints/`). Stage I runs export its parts (tokenizer/, diffusion/, mask_decoder/:
Stage II's `init_tokenizer`); Stage II / III runs export `SeTokIM.save_pretrained` (Stage
III's `init_from`, the eval suite's and `tools/chat.py`'s model). The checkpoint is the
run's latest unless --checkpoint names a step directory. Pipeline runs export every step
themselves (`RUN_DIR/<stage>/export`). The export is written to a temporary directory
beside EXPORT_DIR and renamed into place, so a killed export leaves no half-written model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def export_run(run_dir: Path, out: Path, checkpoint: Path | None = None) -> Path:
    """Rebuild the run's stage from its config.yaml and export `checkpoint` (default latest)."""
    from omegaconf import OmegaConf

    from setok_experiments.compose import from_yaml
    from setokim.stages import build_stage
    from setokim.stages.pipeline import export_step
    from setokim.train import latest_checkpoint

    config = run_dir / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"RUN_DIR: {run_dir} has no config.yaml (not a launcher run dir)")
    text = config.read_text(encoding="utf-8")
    cfg = from_yaml(text)
    name = cfg.stage.name
    if name == "pipeline":
        raise ValueError(
            f"RUN_DIR: {run_dir} is a pipeline run; each step is exported to "
            f"{run_dir}/<stage>/export when it finishes"
        )
    if checkpoint is None:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"RUN_DIR: {run_dir} has no checkpoint yet")
    elif not checkpoint.is_dir():
        raise FileNotFoundError(f"--checkpoint: {checkpoint} is not a directory")
    params = OmegaConf.to_container(OmegaConf.create(text).stage.params, resolve=True)
    stage = build_stage(name, params)  # type: ignore[arg-type]
    out.parent.mkdir(parents=True, exist_ok=True)
    done = export_step(stage, checkpoint, out)
    if done is None:
        raise ValueError(f"stage {name!r} has no model to export")
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a launcher run directory")
    parser.add_argument("--out", type=Path, required=True, help="export directory to write")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint step dir")
    args = parser.parse_args()
    try:
        out = export_run(args.run_dir, args.out, args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
