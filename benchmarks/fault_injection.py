"""Fault injection: kill training at random points, damage checkpoints, craft pickles; print
what became of each case: resumed bit-identical / fell back / clear error / silent wrong /
CODE EXECUTED.

    uv run python benchmarks/fault_injection.py --kills 2 --out fault_injection.json

Kills: each objective (quickstart; Stage I as a combined run, killed in sub-phase 1 and in
sub-phase 2) with SIGTERM and SIGKILL at `--kills` random steps of each phase, resumed in a
fresh process and compared bit for bit with an uninterrupted run. Damage (toy stage, in
process): flipped bytes, truncated and emptied files in the newest checkpoint, a missing or
extra file, a broken manifest. Crafted pickles (manifest resealed, as by someone who can
write the run dir) in the RNG file, DCP's .metadata and trainer_state.json. A relaunch of a
finished run. Targets: 0 silent wrong, 0 code executed.
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import signal
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from setokim.stages import build_stage
from setokim.train import TrainerConfig, list_checkpoints, load_model_state, train
from setokim.train.checkpoint import MANIFEST_FILE, CheckpointError, file_digest
from setokim.train.faults import damage, differing, kill_at_step, tiny_jobs

KILL_SETTINGS = {"max_steps": 8, "lr": 1e-3, "warmup_steps": 2, "ckpt_every": 1, "keep_last": 2}
# stage1's first 4 micro-batches (steps 1-4) are sub-phase 1, steps 5-8 sub-phase 2
PHASES = {"quickstart": {"-": (1, 7)}, "stage1": {"1": (1, 4), "2": (5, 7)}}
TOY = {"hidden": 16, "depth": 1}


def kill_cases(root: Path, kills: int, rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for name, job in tiny_jobs(root / "data", KILL_SETTINGS).items():
        rc, _, err = job.run(root / f"{name}_ref")
        if rc != 0:
            raise RuntimeError(f"reference run of {name} failed: {err}")
        want = job.weights(root / f"{name}_ref")
        for phase, (low, high) in PHASES[name].items():
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for k in range(kills):
                    step = rng.randint(low, high)
                    run = root / f"{name}_p{phase}_{sig.name}_{k}"
                    kill_at_step(job, run, step, sig, delay_s=rng.uniform(0, 0.3))
                    rc, summary, err = job.run(run)
                    if rc != 0:
                        outcome, note = "clear error", err.strip().splitlines()[-1][:200]
                    elif differing(job.weights(run), want):
                        outcome, note = "silent wrong", "final weights differ"
                    else:
                        outcome = "resumed bit-identical"
                        note = f"resumed from {summary['resumed_from'] if summary else '?'}"
                    rows.append({"case": f"kill {name} phase {phase} {sig.name} after step "
                                 f"{step}", "outcome": outcome, "note": note})  # fmt: skip
    return rows


def _toy_cfg(max_steps: int) -> TrainerConfig:
    return TrainerConfig(max_steps=max_steps, micro_batch_size=4, lr=3e-3, ckpt_every=2,
                         keep_last=2, log_every=1, progress=False)  # fmt: skip


def _toy_weights(run: Path) -> dict[str, Any]:
    model = build_stage("toy", TOY).build_model()
    return load_model_state(list_checkpoints(run)[-1], model).state_dict()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _stopped_at_6(run: Path) -> Path:
    def hook(step: int, loss: float) -> None:
        if step == 6:
            signal.raise_signal(signal.SIGTERM)

    train(build_stage("toy", TOY), _toy_cfg(8), run, on_step=hook)
    return list_checkpoints(run)[-1]


def _resume_and_judge(run: Path, want: dict[str, Any], marker: Path | None) -> tuple[str, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = train(build_stage("toy", TOY), _toy_cfg(8), run)
        except CheckpointError as err:
            outcome, note = "clear error", str(err)[:200]
        else:
            bad = differing(_toy_weights(run), want)
            rejected = [str(w.message) for w in caught if "failed verification" in str(w.message)]
            if bad:
                outcome, note = "silent wrong", f"{len(bad)} tensors differ"
            elif rejected:
                outcome, note = (
                    "fell back",
                    f"resumed from {result.resumed_from}; " + rejected[0][:150],
                )
            else:
                outcome, note = "resumed bit-identical", f"resumed from {result.resumed_from}"
    if marker is not None and marker.exists():
        outcome = "CODE EXECUTED"
    return outcome, note


def damage_cases(root: Path, rng: random.Random) -> list[dict[str, Any]]:
    ref = root / "toy_ref"
    train(build_stage("toy", TOY), _toy_cfg(8), ref)
    want = _toy_weights(ref)
    rows = []
    targets = ["__0_0.distcp", ".metadata", "rng_rank0.safetensors", "trainer_state.json"]
    cases = [(mode, name) for name in targets for mode in ("flip", "truncate", "empty")]
    cases += [("delete", "__0_0.distcp"), ("extra", "rng_rank0.pt"), ("flip", MANIFEST_FILE)]
    for i, (mode, name) in enumerate(cases):
        run = root / f"damage_{i}"
        step_dir = _stopped_at_6(run)
        path = step_dir / name
        if mode == "delete":
            path.unlink()
        elif mode == "extra":
            path.write_bytes(b"stray")
        else:
            damage(path, mode, rng, flips=400)
        outcome, note = _resume_and_judge(run, want, None)
        rows.append({"case": f"{mode} {name} of the newest checkpoint", "outcome": outcome,
                     "note": note})  # fmt: skip
    for name in ("rng_rank0.safetensors", ".metadata", "trainer_state.json"):
        run = root / f"crafted_{name.strip('.')}"
        step_dir = _stopped_at_6(run)
        marker = root / f"executed_{name.strip('.')}"
        (step_dir / name).write_bytes(pickle.dumps(_Payload(marker)))
        manifest = json.loads((step_dir / MANIFEST_FILE).read_text())
        manifest["files"][name] = file_digest(step_dir / name)  # resealed
        (step_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
        outcome, note = _resume_and_judge(run, want, marker)
        rows.append({"case": f"crafted pickle in {name} (manifest resealed)", "outcome": outcome,
                     "note": note})  # fmt: skip
    before = _toy_weights(ref)
    result = train(build_stage("toy", TOY), _toy_cfg(8), ref)
    same = not differing(_toy_weights(ref), before) and result.step == 8
    rows.append({"case": "relaunch of a finished run", "outcome":
                 "unchanged" if same else "silent wrong", "note": f"step {result.step}"})  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="random kill points per "
                        "objective, phase and signal (the issue's target: 20)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-kills", action="store_true", help="damage cases only")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fault_injection_") as tmp:
        root = Path(tmp)
        rows = damage_cases(root, rng)
        if not args.no_kills:
            rows += kill_cases(root, args.kills, rng)
    width = max(len(r["case"]) for r in rows)
    for r in rows:
        print(f"{r['case']:<{width}}  {r['outcome']:<22}  {r['note']}")
    counts = Counter(r["outcome"] for r in rows)
    print(f"\n{len(rows)} cases in {time.perf_counter() - start:.0f} s: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps({"rows": rows, "counts": counts}, indent=2))
    return 1 if counts.get("silent wrong") or counts.get("CODE EXECUTED") else 0


if __name__ == "__main__":
    raise SystemExit(main())
