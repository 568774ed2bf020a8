"""Merge splits of several shard dirs into one split of a new shard dir (a stage's training set).

Each --source is DIR[:SPLIT[:KEY_PREFIX]] (SPLIT defaults to train). Shards are hard-linked
when on the same filesystem (else copied), never modified; a KEY_PREFIX rewrites that
source's shards with prefixed sample keys, for sources whose keys collide. Example:
  python tools/data/merge_shards.py data/setokim_stage2 --source data/llava_cc3m:train \\
      --source data/allava:train --source data/ip2p:train
"""

from __future__ import annotations

import argparse
import sys

from setokim.data.merge import LINK_MODES, MergeSource, merge_datasets
from setokim.data.shards import read_manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", help="new shard dir (must not exist unless --overwrite)")
    p.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="DIR[:SPLIT[:KEY_PREFIX]]",
        help="a shard dir and the split to take (repeat for each dataset)",
    )
    p.add_argument("--split", default="train", help="the merged split's name (default train)")
    p.add_argument("--link", choices=LINK_MODES, default="hard")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    sources = [MergeSource.parse(s) for s in a.source]
    out = merge_datasets(
        sources, a.out, split=a.split, link=a.link, overwrite=a.overwrite,
        progress=not a.no_progress,
    )  # fmt: skip
    m = read_manifest(out)
    body = m["splits"][a.split]
    print(
        f"{a.split}: {body['num_samples']} samples in {len(body['shards'])} shards from "
        f"{len(sources)} sources -> {out} (version {m['version']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
