"""Compare evaluated runs: leaderboard.md, leaderboard.csv and index.html with plots.

    python eval_suite/leaderboard.py RUN_DIR... --baseline RUN [--out DIR] [--allow-mixed-data]

A RUN_DIR is a run folder holding eval/results.json, an eval folder holding results.json,
or the results.json itself.
"""

from __future__ import annotations

import argparse
import sys

from setok_eval.leaderboard import MixedDataError, build_leaderboard


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="run folders (or results.json files) to compare")
    parser.add_argument(
        "--baseline", required=True, help="the run the others are compared with (path or name)"
    )
    parser.add_argument(
        "--out", default="leaderboard", help="output folder (default: ./leaderboard)"
    )
    parser.add_argument(
        "--allow-mixed-data",
        action="store_true",
        help="compare runs evaluated on different data versions (noted in the report)",
    )
    parser.add_argument("--resamples", type=int, default=1000, help="paired bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        written = build_leaderboard(
            args.runs,
            args.baseline,
            args.out,
            allow_mixed_data=args.allow_mixed_data,
            n_resamples=args.resamples,
            seed=args.seed,
        )
    except MixedDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
