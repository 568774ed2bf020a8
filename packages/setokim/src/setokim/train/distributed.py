"""Where this process sits in the job: rank, world size, device, and the process group.

Sources, in order: torchrun (RANK/WORLD_SIZE), SLURM (SLURM_PROCID/SLURM_NTASKS, one task
per GPU, MASTER_ADDR = the first host of the nodelist), else a single process.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """The process's place in the job; `source` says which launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """First hostname of a SLURM nodelist: 'gpu[003-005,009],cpu1' -> 'gpu003'."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("nodelist: empty SLURM nodelist")
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if match is None:
        raise ValueError(f"nodelist: cannot parse SLURM nodelist {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _slurm_port(job_id: str) -> int:
    # Stable per job so every task agrees without talking; away from well-known ports.
    digits = int(re.sub(r"\D", "", job_id) or "0")
    return 20000 + digits % 20000


def detect_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Read the distributed layout from environment variables (no side effects)."""
    env = dict(os.environ if environ is None else environ)
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            source="torchrun",
        )
    ntasks = int(env.get("SLURM_NTASKS", "1") or "1")
    if "SLURM_PROCID" in env and ntasks > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=ntasks,
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
            master_port=int(env.get("MASTER_PORT") or _slurm_port(env.get("SLURM_JOB_ID", "0"))),
            source="slurm",
        )
    return DistEnv(0, 1, 0, "127.0.0.1", 0, "single")


def select_device(env: DistEnv) -> torch.device:
    """One task per GPU: cuda:local_rank when CUDA exists, else the CPU."""
    if torch.cuda.is_available():
        index = env.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed(env: DistEnv, device: torch.device) -> bool:
    """Join the process group (nccl on GPU, gloo on CPU); returns True if this call made it."""
    if not env.distributed or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        device_id=device if device.type == "cuda" else None,
    )
    return True


def shutdown_distributed(created: bool) -> None:
    """Leave the process group, but only if `init_distributed` created it."""
    if created and dist.is_initialized():
        dist.destroy_process_group()
