"""Convert VQAv2 questions (+ annotations) and COCO 2014 images to setokim shards."""

import argparse
import sys

from setokim.data.converters import convert_vqav2
from setokim.data.converters.common import add_write_arguments, summary, tool_errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", required=True, help="COCO 2014 image folder")
    p.add_argument("--out", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--questions-json", required=True)
    p.add_argument("--annotations-json", help="omit for test-dev questions")
    p.add_argument("--coco-split", default="val", help="the {split} in COCO_{split}2014_*.jpg")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    add_write_arguments(p)
    a = p.parse_args(argv)
    with tool_errors():
        m = convert_vqav2(a.images, a.out, a.split, questions_json=a.questions_json, annotations_json=a.annotations_json,
                          coco_split=a.coco_split, samples_per_shard=a.samples_per_shard, progress=True, overwrite=a.overwrite, skip_bad=a.skip_bad
        )  # fmt: skip
    print(summary(m, a.split, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
