"""Export a Shapes World split as eval-suite task documents (setok_eval JSONL + PNG files).

    python tools/export_eval_data.py SHARD_DIR --split test --out DATA_ROOT [--limit N]
    python eval_suite/run.py --adapter MOD:FACTORY --tasks shapes_vqa shapes_rec \
        --data-root DATA_ROOT --out runs/x/eval

Writes DATA_ROOT/data/eval/shapes_*.jsonl, their images/masks under data/eval/shapes/ and
data/eval/shapes_export.json (split and data version of the shards).
"""

from __future__ import annotations

import argparse
import sys

from setokim.data.eval_export import export_eval_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("shard_dir", help="Shapes World folder with manifest.json and shards")
    parser.add_argument("--split", default="test", help="split to export (default: test)")
    parser.add_argument("--out", required=True, help="data root (task paths are relative to it)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    paths = export_eval_data(
        args.shard_dir, args.split, args.out, limit=args.limit, progress=not args.no_progress
    )
    for name, path in paths.items():
        with open(path, encoding="utf-8") as handle:
            count = sum(1 for line in handle if line.strip())
        print(f"{name}: {count} documents -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
