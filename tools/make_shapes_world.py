"""Generate a Shapes World dataset: shards, manifest.json, dataset_card.json, README.md.

Same arguments -> byte-identical shards.
"""

from __future__ import annotations

import argparse
import sys

from setokim.data.generate import generate_dataset
from setokim.data.shapes_world import World


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--val", type=int, default=100)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument(
        "--world", type=World.from_json, default=World(),
        help='JSON: {"shapes": [...], "object_scale": 1.6, "max_rotation": 0, "max_objects": 4}',
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it already holds anything"
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        manifest = generate_dataset(
            args.out, args.train, args.val, args.test, args.image_size, args.seed,
            samples_per_shard=args.samples_per_shard, world=args.world,
            progress=not args.no_progress, overwrite=args.overwrite,
        )  # fmt: skip
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = {s: b["num_samples"] for s, b in manifest["splits"].items()}
    print(f"wrote {counts} to {args.out} (data version {manifest['version']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
