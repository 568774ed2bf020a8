"""Shapes World generator and shard loader throughput.

Generator: images/s in one process (one core) at each image size. Loader: samples/s of the
"caption" view (images + masks + boxes decoded and collated) with 0 and 2 DataLoader
workers. Prints a table, the worker speed-up ratios and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from setokim.data.generate import generate_dataset
from setokim.data.loader import make_loader


def bench_loader(shard_dir: Path, workers: int, batch_size: int, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        loader = make_loader(shard_dir, "train", "caption", batch_size, num_workers=workers)
        t0 = time.perf_counter()
        n = sum(len(b["key"]) for b in loader)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=400, help="train images per size")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, float] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes:
            out = Path(tmp) / f"sw{size}"
            t0, c0 = time.perf_counter(), time.process_time()
            generate_dataset(out, a.images, 0, 0, size, seed=0, samples_per_shard=100)
            gen = a.images / (time.perf_counter() - t0)
            results[f"gen_img_cpu_s_{size}"] = a.images / (time.process_time() - c0)
            l0 = bench_loader(out, 0, a.batch_size, a.repeats)
            l2 = bench_loader(out, 2, a.batch_size, a.repeats)
            results.update(
                {
                    f"gen_img_s_{size}": gen,
                    f"load_w0_s_{size}": l0,
                    f"load_w2_s_{size}": l2,
                    f"w2_over_w0_{size}": l2 / l0,
                }
            )
            rows.append((size, gen, l0, l2, l2 / l0))
    print(
        f"machine: {platform.processor() or platform.machine()}, torch threads 1, {a.images} images per size"
    )
    print(
        f"{'size':>5} {'generator img/s':>16} {'loader w=0 /s':>14} {'loader w=2 /s':>14} {'w2/w0':>6}"
    )
    for size, gen, l0, l2, ratio in rows:
        print(f"{size:>5} {gen:>16.1f} {l0:>14.1f} {l2:>14.1f} {ratio:>6.2f}")
    cpu = ", ".join(f"{s}px {results[f'gen_img_cpu_s_{s}']:.1f}" for s in a.sizes)
    print(f"generator img per CPU-second (robust to a shared machine): {cpu}")
    print(
        json.dumps(
            {"bench": "data", "images": a.images, **{k: round(v, 2) for k, v in results.items()}}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
