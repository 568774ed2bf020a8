"""Convert COCO captions + instances JSON and images to setokim shards."""

import argparse
import sys

from setokim.data.converters import convert_coco
from setokim.data.converters.common import add_write_arguments, summary, tool_errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", required=True, help="image folder (e.g. val2017/)")
    p.add_argument("--out", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--captions-json", help="captions_{split}2017.json")
    p.add_argument("--instances-json", help="instances_{split}2017.json")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    add_write_arguments(p)
    a = p.parse_args(argv)
    with tool_errors():
        m = convert_coco(a.images, a.out, a.split, captions_json=a.captions_json, instances_json=a.instances_json,
                         samples_per_shard=a.samples_per_shard, progress=True, overwrite=a.overwrite, skip_bad=a.skip_bad
        )  # fmt: skip
    print(summary(m, a.split, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
