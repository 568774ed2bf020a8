"""Shapes World generator and shard loader throughput, and task-mix planning.

Generator: images/s in one process (one core) at each image size. Loader: samples/s of the
"caption" view (images + masks + boxes decoded and collated) with 0 and 2 DataLoader
workers, and the tar member bytes the busiest of the 2 workers reads in an epoch over what
the 0-worker loader reads (each worker reads only the samples it decodes: about 1/2). Mix planning: seconds to plan one epoch of a task mix (every rank's plan, as each
rank does) over the first size's split, from the shards' index sidecars vs by scanning the
tars (sidecars deleted). Prints a table, the ratios and a final JSON line. `--mix-plan`
runs only the planning comparison (on a split of --images samples at the first size).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from setokim.data.generate import generate_dataset
from setokim.data.loader import make_loader
from setokim.data.mix_plan import clear_index_cache
from setokim.data.shard_index import INDEX_SUFFIX


def bench_loader(shard_dir: Path, workers: int, batch_size: int, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        loader = make_loader(shard_dir, "train", "caption", batch_size, num_workers=workers)
        t0 = time.perf_counter()
        n = sum(len(b["key"]) for b in loader)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def read_share(shard_dir: Path, workers: int, batch_size: int) -> float:
    """Bytes the busiest of `workers` DataLoader workers reads in one epoch over the bytes the
    0-worker loader reads (each worker's iteration run in this process, decoding included)."""

    def bytes_read(wid: int, nw: int) -> int:
        ds = make_loader(shard_dir, "train", "caption", batch_size).dataset
        for _ in ds.iter_worker(wid, nw):
            pass
        return ds.bytes_read

    return max(bytes_read(w, workers) for w in range(workers)) / bytes_read(0, 1)


def time_mix_plan(shard_dir: Path, world_size: int, repeats: int) -> float:
    """Best milliseconds to build rank 0's loader of a mix (indexes every shard, plans all ranks)."""
    best = float("inf")
    for _ in range(repeats):
        clear_index_cache()
        t0 = time.perf_counter()
        make_loader(shard_dir, "train", "mix", 8, world_size=world_size, expand=True)
        best = min(best, (time.perf_counter() - t0) * 1e3)
    clear_index_cache()
    return best


def bench_mix_plan(shard_dir: Path, work: Path, world_size: int, repeats: int) -> dict[str, float]:
    """Planning with sidecars vs a copy of the split without them (tar scan)."""
    bare = work / "no_sidecars"
    shutil.copytree(shard_dir, bare)
    for p in bare.glob(f"*{INDEX_SUFFIX}"):
        p.unlink()
    side = time_mix_plan(shard_dir, world_size, repeats)
    scan = time_mix_plan(bare, world_size, repeats)
    shutil.rmtree(bare)
    return {
        "mix_plan_sidecar_ms": side,
        "mix_plan_scan_ms": scan,
        "mix_plan_scan_over_sidecar": scan / side,
    }


def print_mix_plan(r: dict[str, float], images: int, world_size: int) -> None:
    print(
        f"mix plan, one epoch, {images} samples, {world_size} ranks: sidecars "
        f"{r['mix_plan_sidecar_ms']:.1f} ms, tar scan {r['mix_plan_scan_ms']:.1f} ms, "
        f"scan/sidecar {r['mix_plan_scan_over_sidecar']:.1f}x"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=400, help="train images per size")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--world-size", type=int, default=16, help="ranks planned (mix planning)")
    p.add_argument("--mix-plan", action="store_true", help="only the mix-planning comparison")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, float] = {}
    rows = []
    if a.mix_plan:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "sw"
            generate_dataset(out, a.images, 0, 0, a.sizes[0], seed=0, samples_per_shard=100)
            results = bench_mix_plan(out, Path(tmp), a.world_size, a.repeats)
        print_mix_plan(results, a.images, a.world_size)
        print(
            json.dumps(
                {"bench": "data_mix_plan", "images": a.images, "world_size": a.world_size,
                 **{k: round(v, 2) for k, v in results.items()}}
            )
        )  # fmt: skip
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes:
            out = Path(tmp) / f"sw{size}"
            t0, c0 = time.perf_counter(), time.process_time()
            generate_dataset(out, a.images, 0, 0, size, seed=0, samples_per_shard=100)
            gen = a.images / (time.perf_counter() - t0)
            results[f"gen_img_cpu_s_{size}"] = a.images / (time.process_time() - c0)
            l0 = bench_loader(out, 0, a.batch_size, a.repeats)
            l2 = bench_loader(out, 2, a.batch_size, a.repeats)
            share = read_share(out, 2, a.batch_size)
            results.update(
                {
                    f"gen_img_s_{size}": gen,
                    f"load_w0_s_{size}": l0,
                    f"load_w2_s_{size}": l2,
                    f"w2_over_w0_{size}": l2 / l0,
                    f"w2_read_over_w0_{size}": share,
                }
            )
            rows.append((size, gen, l0, l2, l2 / l0, share))
            if size == a.sizes[0]:
                results.update(bench_mix_plan(out, Path(tmp), a.world_size, a.repeats))
    print(
        f"machine: {platform.processor() or platform.machine()}, torch threads 1, {a.images} images per size"
    )
    print(
        f"{'size':>5} {'generator img/s':>16} {'loader w=0 /s':>14} {'loader w=2 /s':>14} "
        f"{'w2/w0':>6} {'bytes/worker w2/w0':>19}"
    )
    for size, gen, l0, l2, ratio, share in rows:
        print(f"{size:>5} {gen:>16.1f} {l0:>14.1f} {l2:>14.1f} {ratio:>6.2f} {share:>19.2f}")
    cpu = ", ".join(f"{s}px {results[f'gen_img_cpu_s_{s}']:.1f}" for s in a.sizes)
    print(f"generator img per CPU-second (robust to a shared machine): {cpu}")
    print_mix_plan(results, a.images, a.world_size)
    print(
        json.dumps(
            {"bench": "data", "images": a.images, **{k: round(v, 2) for k, v in results.items()}}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
