"""Benchmark the SeTok clustering and merger against their floors and loop references.

Default shape: B=32 images, N=576 tokens (24x24 grid), D=1024, fp32, CPU; K=64 clusters.
Features are grouped (random regions of the grid share a centre vector, plus noise) and
L2-normalised, as SeTok feeds them to the clustering.

Time: variants run interleaved in rounds (one call of each per round); the best of the
rounds is reported (a shared CPU only ever adds time) with the median beside it. The slow
loop references run once.
- floor: one batched x·xᵀ (B, N, N), the least any exact density-peak method must do;
- clustering: density_peak_scores(keep_d2=True) + semantic_clustering(d2=...) with the
  adaptive kernel (the default), soft (the API default) and hard (SeTok's default) assignment;
- loop: clustering_reference, written from the formulas: per image, per token distance rows
  sum((x - x_i)²), per token rho/delta, per step Algorithm 1;
- loop_gemm: the same loops with one matmul distance matrix per image;
- merger: ClusterMerger (2 blocks, 2 heads) batched forward vs its per-cluster forward_loop,
  on the hard clusters above, without gradients. Both gather only each cluster's tokens, so
  they do the same dense-layer arithmetic; the roofline rows say how far apart they can be:
  merger_dense_floor = the merger's linear-layer FLOPs at this machine's measured matmul
  rate (one (tokens x D) @ (D x 4D) linear, best of the rounds), and
  merger_loop_vs_dense_floor = the loop's time over that floor, the largest
  merger_vs_loop any exact batched merger could reach here.

Memory: each variant runs in a fresh subprocess. After its input is built (and a tiny warm-up
has loaded the kernels) the process resets its peak-RSS counter (`5` into
/proc/self/clear_refs, which clears VmHWM) and notes VmRSS; after the call VmHWM - VmRSS is
the peak extra memory, reported over the size of one fp32 (B, N, N) matrix. Where the reset
is not permitted the rusage high-water mark delta is used instead (printed as the method).
The floor variant is measured the same way as a calibration (about 1.0 expected).

`--device cuda` runs the timed variants on the GPU (synchronising around each call) and
measures memory as torch.cuda's peak allocation over the input's; the loop references stay
the same code, so the ratios there say what batching buys on that device.

The last line printed is one JSON object with the ratios and absolute figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm


@dataclass
class Shape:
    batch: int
    grid: int
    dim: int
    clusters: int
    knn_k: int
    regions: int
    seed: int

    @property
    def tokens(self) -> int:
        return self.grid * self.grid


def make_features(shape: Shape) -> torch.Tensor:
    """(B, N, D) L2-normalised features: each grid cell takes its nearest region's centre."""
    g = torch.Generator().manual_seed(shape.seed)
    b, side, d, r = shape.batch, shape.grid, shape.dim, shape.regions
    cells = torch.stack(
        torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1
    ).reshape(-1, 2)
    anchors = torch.rand(b, r, 2, generator=g) * side
    region = torch.cdist(cells.float()[None].expand(b, -1, -1), anchors).argmin(-1)  # (B, N)
    centres = torch.randn(b, r, d, generator=g)
    x = centres.gather(1, region[..., None].expand(-1, -1, d))
    x = x + 0.5 * torch.randn(b, side * side, d, generator=g)
    return F.normalize(x, dim=-1)


def clustering(x: torch.Tensor, shape: Shape, assignment: str = "soft"):
    from setok_tokenizer.clustering import density_peak_scores, semantic_clustering

    scores = density_peak_scores(x, shape.knn_k, keep_d2=True)
    return semantic_clustering(x, scores, shape.clusters, assignment=assignment, d2=scores.d2)


def floor(x: torch.Tensor, shape: Shape) -> torch.Tensor:
    return torch.bmm(x, x.transpose(1, 2))


def loop(x: torch.Tensor, shape: Shape, gemm: bool = False):
    from setok_tokenizer.clustering_reference import (
        reference_density_peak_scores,
        reference_semantic_clustering,
    )

    scores = reference_density_peak_scores(x, shape.knn_k, gemm=gemm)
    return reference_semantic_clustering(x, scores, shape.clusters, gemm=gemm)


def merger_dense_flops(tokens: int, dim: int, hidden: int, blocks: int) -> int:
    """Multiply-add FLOPs of the merger's linear layers: qkv, out, two MLP layers per block."""
    return 2 * tokens * blocks * (3 * dim * dim + dim * dim + 2 * dim * hidden)


def matmul_rate(tokens: int, dim: int, hidden: int, rounds: int, device: str) -> float:
    """FLOP/s of one (tokens x dim) @ (dim x hidden) linear, best of `rounds`."""
    a = torch.randn(tokens, dim, device=device)
    w = torch.randn(hidden, dim, device=device)
    F.linear(a, w)
    best = min(timed(lambda: F.linear(a, w)) for _ in range(max(rounds, 2)))
    return 2 * tokens * dim * hidden / best


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def cuda_memory(variant: str, x: torch.Tensor, shape: Shape) -> dict:
    """Peak CUDA allocation of one call of `variant` above what was allocated before it."""
    fn = {"floor": floor, "clustering": clustering}[variant]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(x, shape)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return {"extra_bytes": peak - base, "method": "torch.cuda peak"}


def interleaved(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up: first calls load kernels and grow the heap
        fn()
    for _ in tqdm(range(rounds), desc="timing rounds", file=sys.stderr):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return times


# ----------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(variant: str, shape: Shape) -> None:
    """Runs in a fresh process: prints the peak extra bytes of one call of `variant`."""
    x = make_features(shape)
    small = Shape(2, 4, 8, 3, shape.knn_k, 2, 0)
    fn = {"floor": floor, "clustering": clustering}[variant]
    fn(make_features(small), small)  # warm-up on a tiny input: loads kernels, not memory
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM reset"
        base = _status_kib("VmRSS")
        out = fn(x, shape)
        peak = _status_kib("VmHWM")
    except OSError:
        method = "ru_maxrss delta"
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = fn(x, shape)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    print(json.dumps({"extra_bytes": (peak - base) * 1024, "method": method}))


def measure_memory(variant: str, shape: Shape, threads: int | None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--memory-child",
        variant,
        "--shape",
        json.dumps(asdict(shape)),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="B=4, 12x12 grid, D=256: seconds")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds of the fast variants")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--skip-loop", action="store_true", help="skip the slow references")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (timed variants)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, Shape(**json.loads(args.shape)))
        return

    if args.small:
        shape = Shape(batch=4, grid=12, dim=256, clusters=16, knn_k=5, regions=6, seed=0)
    else:
        shape = Shape(batch=32, grid=24, dim=1024, clusters=64, knn_k=5, regions=12, seed=0)
    from setok_tokenizer.merger import ClusterMerger

    torch.manual_seed(0)
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    x = make_features(shape).to(args.device)
    b, n, d = x.shape
    d2_bytes = b * n * n * 4
    print(f"B={b} N={n} D={d} K={shape.clusters} knn_k={shape.knn_k} fp32 CPU")
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name()}" if args.device != "cpu" else "")
    )

    with torch.no_grad():
        fast = interleaved(
            {
                "floor": lambda: floor(x, shape),
                "clustering": lambda: clustering(x, shape, "soft"),
                "clustering_hard": lambda: clustering(x, shape, "hard"),
            },
            args.rounds,
        )
        hard = clustering(x, shape, "hard")
        grid = x.reshape(b, shape.grid, shape.grid, d)
        merger = ClusterMerger(d, num_blocks=2, num_heads=2).to(args.device).eval()
        merge = interleaved(
            {"merger": lambda: merger(grid, hard.masks, hard.cluster_valid)},
            max(1, args.rounds - 1),
        )
        entries = int((hard.masks > 0).sum())
        hidden = merger.blocks[0].mlp[0].out_features
        rate = matmul_rate(entries, d, hidden, args.rounds, args.device)
        dense_floor = merger_dense_flops(entries, d, hidden, len(merger.blocks)) / rate
        slow: dict[str, float] = {}
        if not args.skip_loop:
            tasks = {
                "merger_loop": lambda: merger.forward_loop(grid, hard.masks, hard.cluster_valid),
                "loop_gemm": lambda: loop(x, shape, gemm=True),
                "loop": lambda: loop(x, shape, gemm=False),
            }
            for name, fn in tqdm(tasks.items(), desc="loop references", file=sys.stderr):
                slow[name] = timed(fn)
            ref = loop(x, shape, gemm=True)
            ours = clustering(x, shape, "soft")
            agree = bool(torch.equal(ref.seeds, ours.seeds))
            mask_diff = float((ref.masks - ours.masks).abs().max())

    best = {k: min(v) for k, v in (fast | merge).items()}
    median = {k: statistics.median(v) for k, v in (fast | merge).items()}
    if args.device == "cpu":
        mem = {v: measure_memory(v, shape, args.threads) for v in ("floor", "clustering")}
    else:
        mem = {v: cuda_memory(v, x, shape) for v in ("floor", "clustering")}

    rows = [(name, best[name], median[name], best[name] / best["floor"]) for name in best]
    rows += [(name, t, t, t / best["floor"]) for name, t in slow.items()]
    print(f"\n{'variant':<18}{'best s':>10}{'median s':>10}{'x floor':>10}")
    for name, t_best, t_med, ratio in rows:
        print(f"{name:<18}{t_best:>10.4f}{t_med:>10.4f}{ratio:>10.2f}")
    print(f"\npeak extra memory over one fp32 BxNxN ({d2_bytes / 2**20:.1f} MiB):")
    for v, m in mem.items():
        print(f"  {v:<12}{m['extra_bytes'] / d2_bytes:>6.2f}  ({m['method']})")
    print(
        f"merger dense floor: {entries} entries, {rate / 1e9:.1f} GFLOP/s matmul -> "
        f"{dense_floor:.2f} s; batched merger at {dense_floor / best['merger']:.0%} of it"
    )
    if slow:
        print(
            f"largest merger_vs_loop an exact batched merger could reach here: "
            f"{slow['merger_loop'] / dense_floor:.2f}"
        )
        print(f"reference (gemm) seeds equal ours: {agree}; max mask difference {mask_diff:.2e}")

    result = {
        "clustering_vs_floor": best["clustering"] / best["floor"],
        "clustering_vs_loop": slow["loop"] / best["clustering"] if slow else None,
        "merger_vs_loop": slow["merger_loop"] / best["merger"] if slow else None,
        "clustering_mem_vs_d2": mem["clustering"]["extra_bytes"] / d2_bytes,
        "clustering_hard_vs_floor": best["clustering_hard"] / best["floor"],
        "clustering_vs_loop_gemm": slow["loop_gemm"] / best["clustering"] if slow else None,
        "floor_mem_vs_d2": mem["floor"]["extra_bytes"] / d2_bytes,
        "floor_s": best["floor"],
        "clustering_s": best["clustering"],
        "clustering_hard_s": best["clustering_hard"],
        "loop_s": slow.get("loop"),
        "loop_gemm_s": slow.get("loop_gemm"),
        "merger_s": best["merger"],
        "merger_loop_s": slow.get("merger_loop"),
        "merger_dense_floor_s": dense_floor,
        "merger_vs_dense_floor": best["merger"] / dense_floor,
        "merger_loop_vs_dense_floor": slow["merger_loop"] / dense_floor if slow else None,
        "matmul_gflops": rate / 1e9,
        "shape": {"B": b, "N": n, "D": d, "K": shape.clusters, "knn_k": shape.knn_k},
        "threads": torch.get_num_threads(),
        "device": args.device,
        "memory_method": mem["clustering"]["method"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
