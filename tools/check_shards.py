"""Verify every shard of a dataset against its manifest and decode every sample.

A shard's index sidecar (X.tar.index.json), when present, must match its tar (keys and item
counts per task) and its manifest entry; a missing one is fine (older datasets).

Exit 0 when all is well; 1, printing the shard and sample key of each problem (a wrong
field type too, e.g. an integer answer); 2 when the folder is missing or no shard folder.
"""

from __future__ import annotations

import argparse
import sys

from setokim.data.check import check_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("shard_dir", help="directory with manifest.json and the tar shards")
    parser.add_argument("--split", action="append", help="only these splits (repeatable)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        problems = check_shards(args.shard_dir, args.split, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for p in problems:
        print(p)
    print(f"{len(problems)} problem(s)" if problems else "ok: all shards verify and decode")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
