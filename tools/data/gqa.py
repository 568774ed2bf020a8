"""Convert GQA balanced questions and images to setokim shards."""

import argparse
import sys

from setokim.data.converters import convert_gqa


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", required=True, help="GQA images/ folder ({imageId}.jpg)")
    p.add_argument("--out", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--questions-json", required=True, help="{split}_balanced_questions.json")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    a = p.parse_args(argv)
    m = convert_gqa(a.images, a.out, a.split, questions_json=a.questions_json,
                    samples_per_shard=a.samples_per_shard, progress=True)  # fmt: skip
    print(f"{a.split}: {m['splits'][a.split]['num_samples']} samples -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
