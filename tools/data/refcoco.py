"""Convert refCOCO/refCOCO+/refCOCOg (refs pickle + instances.json) to setokim shards."""

import argparse
import sys

from setokim.data.converters import convert_refcoco
from setokim.data.converters.common import add_write_arguments, summary, tool_errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", required=True, help="COCO train2014 image folder")
    p.add_argument("--out", required=True)
    p.add_argument("--split", required=True, help="output split name")
    p.add_argument("--refs", required=True, help="refs(unc).p / refs(umd).p / refs(google).p")
    p.add_argument("--instances-json", required=True)
    p.add_argument("--ref-split", help="train/val/test/testA/testB (default: --split)")
    p.add_argument("--dataset", default="refcoco", choices=["refcoco", "refcoco+", "refcocog"])
    p.add_argument("--samples-per-shard", type=int, default=1000)
    add_write_arguments(p)
    a = p.parse_args(argv)
    with tool_errors():
        m = convert_refcoco(a.images, a.out, a.split, refs_pickle=a.refs, instances_json=a.instances_json,
                            ref_split=a.ref_split, dataset=a.dataset.replace("+", "plus"),
                            samples_per_shard=a.samples_per_shard, progress=True, overwrite=a.overwrite, skip_bad=a.skip_bad
        )  # fmt: skip
    print(summary(m, a.split, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
