"""Pass img2dataset tar shards (CC3M, LAION, ...) through to setokim shards."""

import argparse
import sys

from setokim.data.converters import convert_img2dataset
from setokim.data.converters.common import add_write_arguments, summary, tool_errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("tars", nargs="+", help="img2dataset .tar files")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--source", default="img2dataset", help="e.g. cc3m, laion")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    add_write_arguments(p)
    a = p.parse_args(argv)
    with tool_errors():
        m = convert_img2dataset(a.tars, a.out, a.split, source=a.source,
                                samples_per_shard=a.samples_per_shard, progress=True, overwrite=a.overwrite, skip_bad=a.skip_bad
        )  # fmt: skip
    print(summary(m, a.split, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
