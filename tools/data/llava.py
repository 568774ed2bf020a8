"""Convert LLaVA-style conversation JSON (LLaVA-150K, ShareGPT4V, ALLaVA) to setokim shards."""

import argparse
import sys

from setokim.data.converters import convert_llava
from setokim.data.converters.common import add_write_arguments, summary, tool_errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", required=True, help="the conversation JSON list")
    p.add_argument("--image-root", required=True, help="folder the 'image' paths are relative to")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--source", default="llava", choices=["llava", "sharegpt4v", "allava"])
    p.add_argument("--samples-per-shard", type=int, default=1000)
    add_write_arguments(p)
    a = p.parse_args(argv)
    with tool_errors():
        m = convert_llava(a.json, a.image_root, a.out, a.split, source=a.source,
                          samples_per_shard=a.samples_per_shard, progress=True, overwrite=a.overwrite, skip_bad=a.skip_bad
        )  # fmt: skip
    print(summary(m, a.split, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
