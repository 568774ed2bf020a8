"""Convert InstructPix2Pix or MagicBrush edit pairs to setokim shards."""

import argparse
import sys

from setokim.data.converters import convert_edit_pairs
from setokim.data.converters.common import add_write_arguments, summary, tool_errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--root", required=True, help="dataset root (prompt.json folders / edit_sessions.json)"
    )
    p.add_argument("--layout", required=True, choices=["instructpix2pix", "magicbrush"])
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    add_write_arguments(p)
    a = p.parse_args(argv)
    with tool_errors():
        m = convert_edit_pairs(a.root, a.out, a.split, layout=a.layout,
                               samples_per_shard=a.samples_per_shard, progress=True, overwrite=a.overwrite, skip_bad=a.skip_bad
        )  # fmt: skip
    print(summary(m, a.split, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
