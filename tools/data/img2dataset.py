"""Pass img2dataset tar shards (CC3M, LAION, ...) through to setokim shards."""

import argparse
import sys

from setokim.data.converters import convert_img2dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("tars", nargs="+", help="img2dataset .tar files")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--source", default="img2dataset", help="e.g. cc3m, laion")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    a = p.parse_args(argv)
    m = convert_img2dataset(a.tars, a.out, a.split, source=a.source,
                            samples_per_shard=a.samples_per_shard, progress=True)  # fmt: skip
    print(f"{a.split}: {m['splits'][a.split]['num_samples']} samples -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
