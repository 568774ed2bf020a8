"""Convert SA-1B (sa_NNNNNN.tar files and/or extracted folders) to setokim shards.

Keeps a nearly disjoint subset of each image's SAM masks as its objects (largest first,
overlap <= --max-overlap with those kept, at most --max-objects); see
setokim.data.converters.sa1b. Combine with COCO for Stage I sub-phase 2:
  python tools/data/sa1b.py --inputs sa1b/sa_000000.tar sa1b/sa_000001.tar \\
      --out data/sa1b --split train --max-side 1024
  python tools/data/merge_shards.py data/stage1_coco_sa1b --source data/coco:train \\
      --source data/sa1b:train
"""

import argparse
import sys

from setokim.data.converters.common import add_write_arguments, summary, tool_errors
from setokim.data.converters.sa1b import SA1BStats, Selection, convert_sa1b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--inputs", nargs="+", required=True, metavar="TAR_OR_DIR",
                   help="SA-1B .tar files and/or folders of sa_*.jpg + sa_*.json")  # fmt: skip
    p.add_argument("--out", required=True, help="shard dir (other splits in it are kept)")
    p.add_argument("--split", required=True)
    d = Selection()
    p.add_argument("--max-objects", type=int, default=d.max_objects, help="objects kept per image")
    p.add_argument("--max-overlap", type=float, default=d.max_overlap,
                   help="largest share of a mask already covered by kept masks")  # fmt: skip
    p.add_argument("--min-area-frac", type=float, default=d.min_area_frac,
                   help="drop masks smaller than this share of the image")  # fmt: skip
    p.add_argument("--max-area-frac", type=float, default=d.max_area_frac,
                   help="drop masks larger than this share of the image")  # fmt: skip
    p.add_argument("--max-side", type=int, default=None,
                   help="resize images (and masks) whose longer side exceeds this")  # fmt: skip
    p.add_argument("--samples-per-shard", type=int, default=1000)
    add_write_arguments(p)
    a = p.parse_args(argv)
    stats = SA1BStats()
    sel = Selection(a.max_objects, a.max_overlap, a.min_area_frac, a.max_area_frac)
    with tool_errors():
        m = convert_sa1b(
            a.inputs, a.out, a.split, selection=sel, max_side=a.max_side,
            samples_per_shard=a.samples_per_shard, progress=True, stats=stats, overwrite=a.overwrite, skip_bad=a.skip_bad,
        )  # fmt: skip
    print(summary(m, a.split, a.out) + f"; {stats.masks_kept} / {stats.masks_total} masks kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
