"""kill -9 at random points, then `unifusion train --out DIR --resume`: is the result bit-identical
to a run that was never interrupted?

    .venv/bin/python benchmarks/kill_resume.py [--trials 20] [--mode single|ddp|both]

The recipe is the default (class-conditional digits, EDM, label dropout 0.1) shrunk to 40 steps of
batch 32 with a checkpoint every step, so that a kill often lands inside a checkpoint write: the
script records how many kills left a half-written `.tmp-*` checkpoint folder behind. `ddp` runs
the same under `torchrun --nproc_per_node=2` (gloo) and kills every process of the job (the
launcher and both ranks) at the same moment. Each
trial: start, sleep a random time (seeded), SIGKILL, resume to the end, compare every tensor of
the final checkpoint (model, EMA, optimizer) with the uninterrupted run's.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RECIPE = ["--data", "digits-train", "--steps", "40", "--batch-size", "32", "--checkpoint-every", "1",
          "--keep-checkpoints", "2", "--sample-every", "0", "--sample-nfe", "2", "--warmup-steps", "5",
          "--log-every", "1"]


def command(mode: str, out: Path, resume: bool) -> list[str]:
    if resume:  # what the Ctrl-C message prints: the stored config does the rest
        args = ["train", "--out", str(out), "--resume"]
    else:
        args = ["train", *RECIPE, "--out", str(out)]
    if mode == "ddp":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "unifusion", *args]
    return [sys.executable, "-m", "unifusion", *args]


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(k) for k in out]
    return kids + [d for k in kids for d in descendants(k)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def final_tensors(out: Path) -> dict:
    from unifusion import checkpoint
    tensors, state = checkpoint.load(out)
    assert state["step"] == 40, state["step"]
    return tensors


def identical(a: dict, b: dict) -> bool:
    return all(torch.equal(a[g][k], b[g][k]) for g in ("model", "ema", "optimizer") for k in a[g])


def trial(mode: str, root: Path, reference: dict, delay: float) -> dict:
    out = root / "run"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(command(mode, out, False), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    time.sleep(delay)
    finished = p.poll() is not None
    if not finished:
        # every process of the job at once, as a crash of the machine would: torchrun starts its
        # workers in sessions of their own, so walk the process tree instead of one process group
        for pid in [p.pid] + descendants(p.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    p.wait()
    deadline = time.time() + 30
    while any(_alive(pid) for pid in descendants(p.pid)) and time.time() < deadline:
        time.sleep(0.05)
    ckpts = out / "checkpoints"
    torn = ckpts.is_dir() and any(e.name.startswith(".tmp-") for e in ckpts.iterdir())
    step = 0
    if ckpts.is_dir():
        steps = [int(e.name.split("-")[1]) for e in ckpts.iterdir() if e.name.startswith("step-")]
        step = max(steps, default=0)
    r = subprocess.run(command(mode, out, True), capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        return {"delay": delay, "killed_at": step, "torn": torn, "ok": False, "error": r.stderr[-500:]}
    # the run's final outputs are there too (a kill after the last checkpoint resumes straight to them)
    complete = (out / "model" / "spec.json").is_file() and (out / "samples" / "latest.png").is_file()
    return {"delay": delay, "killed_at": step, "torn": torn, "finished_before_kill": finished,
            "ok": complete and identical(final_tensors(out), reference)}


def run_mode(mode: str, trials: int, seed: int) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix=f"kill-{mode}-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    subprocess.run(command(mode, root / "ref", False), check=True, capture_output=True, env=env)
    duration = time.time() - t0
    reference = final_tensors(root / "ref")
    rng = random.Random(seed)
    results = []
    for i in range(trials):
        # from just after start-up to just before the end of an uninterrupted run
        res = trial(mode, root, reference, rng.uniform(0.3 * duration, 0.95 * duration))
        results.append(res)
        print(f"  {mode} trial {i + 1:2d}: kill after {res['delay']:.2f} s, last checkpoint step "
              f"{res['killed_at']}, torn write {res['torn']}, identical {res['ok']}", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--mode", choices=["single", "ddp", "both"], default="both")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    modes = ["single", "ddp"] if args.mode == "both" else [args.mode]
    table = []
    for mode in modes:
        res = run_mode(mode, args.trials, args.seed)
        table.append((mode, sum(r["ok"] for r in res), len(res), sum(r["torn"] for r in res)))
    print("| run | bit-identical after kill -9 + resume | kills inside a checkpoint write |")
    print("|---|---|---|")
    for mode, ok, n, torn in table:
        name = "1 process" if mode == "single" else "torchrun, 2 gloo ranks"
        print(f"| {name} | {ok}/{n} | {torn} |")


if __name__ == "__main__":
    main()
