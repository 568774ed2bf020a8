"""Convert InstructPix2Pix or MagicBrush edit pairs to setokim shards."""

import argparse
import sys

from setokim.data.converters import convert_edit_pairs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--root", required=True, help="dataset root (prompt.json folders / edit_sessions.json)"
    )
    p.add_argument("--layout", required=True, choices=["instructpix2pix", "magicbrush"])
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    a = p.parse_args(argv)
    m = convert_edit_pairs(a.root, a.out, a.split, layout=a.layout,
                           samples_per_shard=a.samples_per_shard, progress=True)  # fmt: skip
    print(f"{a.split}: {m['splits'][a.split]['num_samples']} samples -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
