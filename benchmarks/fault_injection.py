"""Fault injection: kill training at random points, damage checkpoints, craft pickles; print
what became of each case: resumed bit-identical / fell back / clear error / silent wrong /
data lost / CODE EXECUTED.

    OMP_NUM_THREADS=1 nice -n 15 uv run python benchmarks/fault_injection.py --kills 10 \
        --out fault_injection.json

Kills: every objective and phase (quickstart; Stage I as a combined run, killed in
sub-phase 1 and in sub-phase 2; Stage II; Stage III's LoRA over a Stage II export) with
SIGTERM and SIGKILL at `--kills` random points each (a step drawn from `--seed`, plus a
random delay into the next step or its checkpoint write; a point whose signal would arrive
after the run finished is drawn again). One uninterrupted reference run
per objective; each kill is a fresh run, killed, then resumed in a new process, and its
final weights are compared bit for bit with the reference. "data lost": a step with no
logged loss after the resume, or a SIGTERM that did not save the step it had reached.
Runs are forked from this interpreter after the imports (`setokim.train.faults.ForkedRun`;
`--spawn` starts a fresh interpreter per run instead, ~15 s more each).
Damage (toy stage, in process): flipped bytes, truncated and emptied files in the newest
checkpoint, a missing or extra file, a broken manifest. Crafted pickles (manifest resealed,
as by someone who can write the run dir) in the RNG file, DCP's .metadata and
trainer_state.json. A relaunch of a finished run. Targets: 0 silent wrong, 0 data lost,
0 code executed.
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import shutil
import signal
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from setokim.stages import build_stage
from setokim.train import (
    TrainerConfig,
    latest_checkpoint,
    list_checkpoints,
    load_model_state,
    train,
)
from setokim.train.checkpoint import MANIFEST_FILE, CheckpointError, file_digest
from setokim.train.faults import (
    FaultJob,
    damage,
    differing,
    kill_at_step,
    logged_step,
    tiny_jobs,
)

KILL_SETTINGS = {"max_steps": 8, "lr": 1e-3, "warmup_steps": 2, "ckpt_every": 1, "keep_last": 2}
# stage1's first 4 micro-batches (steps 1-4) are sub-phase 1, steps 5-8 sub-phase 2; a kill
# "after step s" lands at a random moment of the following step (or its checkpoint)
PHASES = {
    "quickstart": {"-": (1, 7)},
    "stage1": {"1": (1, 4), "2": (5, 7)},
    "stage2": {"-": (1, 7)},
    "stage3": {"-": (1, 7)},
}
TOY = {"hidden": 16, "depth": 1}
# a kill point whose signal arrives after the run finished is no kill: drawn again
MAX_REDRAWS = 5


def _gaps(run: Path, max_steps: int) -> list[int]:
    """Steps 1..max_steps with no logged loss in the run's metrics.jsonl (lost progress)."""
    logged = set()
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by SIGKILL
        if "loss" in record:
            logged.add(int(record["step"]))
    return [s for s in range(1, max_steps + 1) if s not in logged]


def _judge_kill(job: FaultJob, run: Path, want: dict[str, Any], sig: int,
                killed_rc: int, logged_at_kill: int) -> tuple[str, str, int | None]:  # fmt: skip
    """(outcome, note, resumed-from step) of a killed run after its resume."""
    rc, summary, err = job.run(run)
    if rc != 0:
        return "clear error", err.strip().splitlines()[-1][:200], None
    resumed = summary["resumed_from"] if summary else None
    if differing(job.weights(run), want):
        return "silent wrong", "final weights differ", resumed
    lost = _gaps(run, KILL_SETTINGS["max_steps"])
    if lost:
        return "data lost", f"no loss logged for steps {lost}", resumed
    if sig == signal.SIGTERM and (killed_rc != 0 or resumed is None or resumed < logged_at_kill):
        return (
            "data lost",
            f"SIGTERM: rc {killed_rc}, saved step {resumed} < {logged_at_kill}",
            resumed,
        )
    return "resumed bit-identical", f"resumed from {resumed}", resumed


def kill_cases(root: Path, kills: int, rng: random.Random, fork: bool,
               only: list[str] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """`kills` random kill points per objective, phase and signal; one uninterrupted
    reference run per objective, each kill a fresh run killed and then resumed."""
    rows = []
    stage3_init = root / "stage2_export"
    jobs = tiny_jobs(root / "data", KILL_SETTINGS, stage3_init=stage3_init, fork=fork)
    for name, job in jobs.items():
        if only and name not in only:
            continue
        if name == "stage3" and not stage3_init.exists():  # Stage III starts from Stage II
            ref2 = root / "stage2_ref"
            if not ref2.exists():
                rc, _, err = jobs["stage2"].run(ref2)
                if rc != 0:
                    raise RuntimeError(f"reference run of stage2 failed: {err}")
            stage2 = build_stage("stage2", jobs["stage2"].params)
            stage2.export(latest_checkpoint(ref2), stage3_init)
        rc, _, err = job.run(root / f"{name}_ref")
        if rc != 0:
            raise RuntimeError(f"reference run of {name} failed: {err}")
        want = job.weights(root / f"{name}_ref")
        for phase, (low, high) in PHASES[name].items():
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for k in range(kills):
                    run = root / f"{name}_p{phase}_{sig.name}_{k}"
                    redrawn = -1
                    while True:
                        redrawn += 1
                        if redrawn > MAX_REDRAWS:
                            raise RuntimeError(f"{run.name}: every kill point came too late")
                        step = rng.randint(low, high)
                        delay = rng.uniform(0, 0.3)
                        killed_rc = kill_at_step(job, run, step, sig, delay_s=delay)
                        logged = logged_step(run)
                        if logged < KILL_SETTINGS["max_steps"] or killed_rc == -signal.SIGKILL:
                            break  # the signal landed before the run had finished
                        shutil.rmtree(run)  # it came after the end: no kill, draw again
                    outcome, note, resumed = _judge_kill(job, run, want, sig, killed_rc, logged)
                    rows.append({"case": f"kill {name} phase {phase} {sig.name} after step "
                                 f"{step}", "objective": name, "phase": phase,
                                 "signal": sig.name, "after_step": step, "logged": logged,
                                 "resumed_from": resumed, "redrawn": redrawn,
                                 "outcome": outcome, "note": note})  # fmt: skip
                    shutil.rmtree(run, ignore_errors=True)
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


def _summary_table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per objective, phase and signal: kills, their steps, resumed-from, outcomes."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if "objective" in r:
            groups.setdefault((r["objective"], r["phase"], r["signal"]), []).append(r)
    lines = []
    for (name, phase, sig), group in groups.items():
        outcomes = Counter(r["outcome"] for r in group)
        steps = " ".join(f"{r['after_step']}>{r['resumed_from']}" for r in group)
        lines.append(f"{name:<10} {phase:<2} {sig:<7} {len(group):>3}  "
                     + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))
                     + f"  [kill after step > resumed from: {steps}]")  # fmt: skip
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="random kill points per "
                        "objective, phase and signal (10: 20 per phase, the issue's target)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-kills", action="store_true", help="damage cases only")
    parser.add_argument("--no-damage", action="store_true", help="kill cases only")
    parser.add_argument("--only", nargs="*", choices=sorted(PHASES), default=None,
                        help="kill cases of these objectives only")  # fmt: skip
    parser.add_argument("--spawn", action="store_true", help="run each job in a fresh "
                        "interpreter (python -m setokim.train.cli) instead of a fork of this "
                        "one (same process boundary and signals, ~15 s more per run)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    fork = not args.spawn
    if fork:  # forked children must not inherit an OpenMP pool of several threads
        torch.set_num_threads(1)
    rng = random.Random(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fault_injection_") as tmp:
        root = Path(tmp)
        rows = [] if args.no_damage else damage_cases(root, rng)
        if not args.no_kills:
            rows += kill_cases(root, args.kills, rng, fork, args.only)
    width = max(len(r["case"]) for r in rows)
    for r in rows:
        print(f"{r['case']:<{width}}  {r['outcome']:<22}  {r['note']}")
    print()
    for line in _summary_table(rows):
        print(line)
    counts = Counter(r["outcome"] for r in rows)
    seconds = time.perf_counter() - start
    print(f"\n{len(rows)} cases in {seconds:.0f} s ({'forked' if fork else 'spawned'} runs): "
          + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps({"rows": rows, "counts": counts, "seconds": seconds,
                                        "kills": args.kills, "seed": args.seed,
                                        "fork": fork}, indent=2))  # fmt: skip
    bad = ("silent wrong", "CODE EXECUTED", "data lost")
    return 1 if any(counts.get(k) for k in bad) else 0


if __name__ == "__main__":
    raise SystemExit(main())
