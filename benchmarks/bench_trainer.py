"""Trainer costs, measured in one run (toy stage, CPU unless CUDA is present).

1. Loop overhead: `setokim.train.train` vs a bare forward/backward/clip/step loop on the same
   model and batches (target <= 1.1x).
2. Data-parallel throughput: 2 gloo ranks (FSDP2) vs 1 process, same micro-batch per rank.
3. Peak memory with activation checkpointing on vs off (CPU: peak RSS via /proc; GPU:
   torch.cuda.max_memory_allocated).
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from setokim.stages import build_stage
from setokim.train import TrainerConfig, train


def bare_loop(stage_cfg: dict, steps: int, mb: int, lr: float, clip: float) -> float:
    """The minimum any trainer must do; returns seconds for `steps` steps."""
    stage = build_stage("toy", stage_cfg)
    torch.manual_seed(0)
    model = stage.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    batches = stage.batches(0, 1, 0, mb)
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = stage.loss(model, next(batches))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def trainer_loop(stage_cfg: dict, steps: int, mb: int, lr: float, clip: float, **kw) -> float:
    cfg = TrainerConfig(
        max_steps=steps, micro_batch_size=mb, lr=lr, clip_grad=clip, log_every=10,
        progress=False, save_final=False, **kw,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as run_dir:
        return train(build_stage("toy", stage_cfg), cfg, run_dir).loop_seconds


def _rank_worker(rank: int, port: int, stage_cfg: dict, steps: int, mb: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(max(1, torch.get_num_threads() // 2))
    cfg = TrainerConfig(max_steps=steps, micro_batch_size=mb, log_every=10, progress=False,
                        save_final=False)  # fmt: skip
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(build_stage("toy", stage_cfg), cfg, run_dir)
    if rank == 0:
        Path(out).write_text(json.dumps({"samples_per_s": result.samples_per_s}))


def two_ranks(stage_cfg: dict, steps: int, mb: int) -> float:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "r.json")
        mp.start_processes(_rank_worker, args=(port, stage_cfg, steps, mb, out), nprocs=2,
                           start_method="fork")  # fmt: skip
        return json.loads(Path(out).read_text())["samples_per_s"]


def one_rank(stage_cfg: dict, steps: int, mb: int) -> float:
    cfg = TrainerConfig(max_steps=steps, micro_batch_size=mb, log_every=10, progress=False,
                        save_final=False)  # fmt: skip
    with tempfile.TemporaryDirectory() as run_dir:
        return train(build_stage("toy", stage_cfg), cfg, run_dir).samples_per_s


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mib(stage_cfg: dict, steps: int, mb: int, ac: bool) -> float:
    """Peak memory above the pre-training level during a short run.

    CPU: measured in a fresh interpreter, since memory freed by an earlier run stays in the
    process heap and would hide the second run's growth from the RSS high-water mark.
    """
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        trainer_loop(stage_cfg, steps, mb, 1e-3, 1.0, activation_checkpointing=ac)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    probe = json.dumps({"stage": stage_cfg, "steps": steps, "mb": mb, "ac": ac})
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-probe", probe],
        capture_output=True, text=True, check=True,
        # every big buffer mmapped, so freed memory leaves RSS and the peak is the real one
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )  # fmt: skip
    return float(proc.stdout.strip().splitlines()[-1])


def _memory_probe(spec: str) -> None:
    args = json.loads(spec)
    # Import what a run imports (AdamW pulls in dynamo), but allocate nothing big: memory
    # freed by a warm-up run would stay in the heap and hide this run's growth.
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.ones(4)
    torch.optim.AdamW([p]).step()
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
    trainer_loop(args["stage"], args["steps"], args["mb"], 1e-3, 1.0,
                 activation_checkpointing=args["ac"])  # fmt: skip
    print((_rss_kib("VmHWM") - base) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-dist", action="store_true")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe is not None:
        _memory_probe(args.memory_probe)
        return

    model = {"hidden": 256, "depth": 4, "in_dim": 64, "out_dim": 16}
    mb, lr, clip = 32, 1e-3, 1.0
    trainer_loop(model, 5, mb, lr, clip)  # warm-up: imports, allocator, first-step costs
    bare_loop(model, 5, mb, lr, clip)
    bare_s, loop_s = [], []
    for _ in range(args.repeats):  # interleaved, best of N: robust to a noisy machine
        bare_s.append(bare_loop(model, args.steps, mb, lr, clip))
        loop_s.append(trainer_loop(model, args.steps, mb, lr, clip))
    overhead = min(loop_s) / min(bare_s)

    rows = [
        ("bare loop, s/step", min(bare_s) / args.steps),
        ("trainer loop, s/step", min(loop_s) / args.steps),
        ("trainer / bare", overhead),
    ]
    result = {"overhead_ratio": overhead, "bare_step_s": min(bare_s) / args.steps,
              "trainer_step_s": min(loop_s) / args.steps}  # fmt: skip

    if not args.skip_dist:
        dist_steps = max(20, args.steps // 4)
        single = one_rank(model, dist_steps, mb)
        double = two_ranks(model, dist_steps, mb)
        rows += [
            ("1 rank samples/s", single),
            ("2 gloo ranks (FSDP2) samples/s", double),
            ("2 ranks / 1 rank", double / single),
        ]
        result.update(one_rank_sps=single, two_rank_sps=double, dist_speedup=double / single)

    big = {"hidden": 256, "depth": 6, "in_dim": 64, "out_dim": 16, "seq_len": 64}
    off = peak_memory_mib(big, 2, 16, ac=False)
    on = peak_memory_mib(big, 2, 16, ac=True)
    rows += [
        ("peak MiB, activation ckpt off", off),
        ("peak MiB, activation ckpt on", on),
        ("on / off", on / off),
    ]
    result.update(peak_mib_ac_off=off, peak_mib_ac_on=on, ac_memory_ratio=on / off)

    device = "cuda" if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()} threads"
    print(f"bench_trainer on {device}, toy MLP hidden 256, micro-batch {mb}")
    for name, value in rows:
        print(f"  {name:<34} {value:10.4f}")
    print(json.dumps({"bench": "trainer", "device": device, **result}))


if __name__ == "__main__":
    main()
