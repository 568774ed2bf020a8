"""Convert GQA balanced questions and images to setokim shards."""

import argparse
import sys

from setokim.data.converters import convert_gqa
from setokim.data.converters.common import add_write_arguments, summary, tool_errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", required=True, help="GQA images/ folder ({imageId}.jpg)")
    p.add_argument("--out", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--questions-json", required=True, help="{split}_balanced_questions.json")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    add_write_arguments(p)
    a = p.parse_args(argv)
    with tool_errors():
        m = convert_gqa(a.images, a.out, a.split, questions_json=a.questions_json,
                        samples_per_shard=a.samples_per_shard, progress=True, overwrite=a.overwrite, skip_bad=a.skip_bad
        )  # fmt: skip
    print(summary(m, a.split, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
