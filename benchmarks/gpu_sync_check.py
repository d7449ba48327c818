"""Does the training step wait for the GPU? Runs the default digits run for a few steps on CUDA with
torch.cuda.set_sync_debug_mode around every steady-state step (not the log or checkpoint steps, which
read the loss and counters on purpose) and reports each synchronising call with where it came from.

    .venv/bin/python benchmarks/gpu_sync_check.py [--steps 24] [--log-every 8] [--error] [--compile reduce-overhead]

Exit status 0 when no steady-state step synchronised, 1 when one did. Without CUDA it says so and
exits 0 (the CPU-side check is tests/test_sync_free.py). set_sync_debug_mode sees the synchronising
CUDA calls that torch makes (item, nonzero, a device-to-host copy, a stream synchronize, ...); a copy
from pageable host memory it may not see, so the loop copies from pinned memory.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--log-every", type=int, default=8)
    p.add_argument("--posthoc-every", type=int, default=0, help="also run the post-hoc EMA (0: off, as by default)")
    p.add_argument("--error", action="store_true", help="raise at the first sync instead of listing them all")
    p.add_argument("--compile", default="off", help="the trainer's --compile mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--skip", type=int, default=None, help="first steps left unchecked (warm-up; compilation and "
                                                          "graph capture): default 2, 6 with --compile")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_sync_check: no CUDA device here, nothing to check (the CPU-side check is tests/test_sync_free.py)")
        return 0

    from unifusion import config
    from unifusion.training import loop as L

    steady = {}  # step -> whether it runs with the sync check on
    current = {"step": None}

    skip = args.skip if args.skip is not None else (2 if args.compile in ("off", "false") else 6)

    def is_steady(step):
        done = step + 1
        return step >= skip and done % args.log_every != 0 and done != args.steps  # not the first steps, not reads

    real_lr_at = L.lr_at

    def lr_at(cfg, step):  # the loop calls it first thing in every step
        if step not in steady:
            steady[step] = is_steady(step)
            torch.cuda.set_sync_debug_mode("error" if args.error and steady[step] else
                                           "warn" if steady[step] else "default")
            current["step"] = step
        return real_lr_at(cfg, step)

    syncs = Counter()
    real_showwarning = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message) and current["step"] is not None and steady.get(current["step"]):
            where = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-2]
                     if "unifusion" in f.filename or "torch/optim" in f.filename][-3:]
            syncs[(str(message).split(".")[0], " <- ".join(reversed(where)))] += 1
        else:
            real_showwarning(message, category, filename, lineno, file, line)

    L.lr_at = lr_at
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        L._preview = lambda *a, **k: Path(d) / "none.png"  # the final sample grid is not a train step
        L.log_curve = lambda *a, **k: Path(d) / "none.png"
        cfg = config.from_dict({"device": "cuda", "steps": args.steps, "log_every": args.log_every,
                                "checkpoint_every": 10**9, "sample_every": 0, "posthoc_every": args.posthoc_every,
                                "compile": args.compile, "out": d})
        try:
            L.train(cfg, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    checked = sorted(s for s, on in steady.items() if on)
    if not checked:
        print("gpu_sync_check: no steady-state step to check; raise --steps or --log-every")
        return 2
    print(f"# {torch.cuda.get_device_name()}: default digits run, --compile {cfg.compile}, {args.steps} steps, log every "
          f"{args.log_every}; "
          f"sync debug mode on in {len(checked)} steady-state steps ({checked[0]}..{checked[-1]})")
    if not syncs:
        print("no synchronising call in a steady-state step")
        return 0
    print(f"{sum(syncs.values())} synchronising calls in {len(checked)} steps:")
    for (msg, where), n in syncs.most_common():
        print(f"  {n:4d}x  {msg}  at  {where}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
