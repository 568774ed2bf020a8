"""Export a split of shards (Shapes World or converted data) as eval-suite task documents.

    python tools/export_eval_data.py SHARD_DIR --split test --out DATA_ROOT [--limit N]
    python tools/export_eval_data.py VQAV2_SHARDS --split test --out DATA_ROOT --task vqa=vqav2_val
    python eval_suite/run.py --adapter setokim --adapter-arg export=EXPORT_DIR \\
        --tasks shapes_vqa shapes_rec --data-root DATA_ROOT --out runs/x/eval

Writes DATA_ROOT/data/eval/{name}.jsonl (by default shapes_{task} for every task of the
split; `--task vqa=vqav2_val` writes the split's questions as the suite's vqav2_val
documents), the images (in the shards' own format) and masks under data/eval/shapes/, and
data/eval/shapes_export.json (source, split and data version of the shards). Tasks the split
has no items for are skipped with a message.
"""

from __future__ import annotations

import argparse
import sys

from setokim.data.eval_export import EVAL_TASKS, export_eval_data, task_name


def _names(items: list[str]) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for item in items:
        task, _, name = item.partition("=")
        out[task] = name or task_name(task)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("shard_dir", help="folder with manifest.json and shards")
    parser.add_argument("--split", default="test", help="split to export (default: test)")
    parser.add_argument("--out", required=True, help="data root (task paths are relative to it)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="TASK[=NAME]",
        help=f"export only these shard tasks {list(EVAL_TASKS)}, as suite task NAME "
        "(default shapes_TASK); repeatable",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        paths = export_eval_data(
            args.shard_dir, args.split, args.out, limit=args.limit,
            progress=not args.no_progress, names=_names(args.task),
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, path in paths.items():
        with open(path, encoding="utf-8") as handle:
            count = sum(1 for line in handle if line.strip())
        print(f"{name}: {count} documents -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
