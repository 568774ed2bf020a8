"""Convert COCO captions + instances JSON and images to setokim shards."""

import argparse
import sys

from setokim.data.converters import convert_coco


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", required=True, help="image folder (e.g. val2017/)")
    p.add_argument("--out", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--captions-json", help="captions_{split}2017.json")
    p.add_argument("--instances-json", help="instances_{split}2017.json")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    a = p.parse_args(argv)
    m = convert_coco(a.images, a.out, a.split, captions_json=a.captions_json, instances_json=a.instances_json,
                     samples_per_shard=a.samples_per_shard, progress=True)  # fmt: skip
    print(f"{a.split}: {m['splits'][a.split]['num_samples']} samples -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
