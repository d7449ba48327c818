"""Reflow on a 2-D toy: straightness S(Z) and one-step samples of the teacher, 2-RF and 3-RF.

The teacher is rectified flow / flow matching on the toy (`unifusion train --process flow
--parametrization velocity`); each reflow draws couplings from the previous model with
`unifusion couple` (dopri5) and trains on them with `--reflow --init-from PREVIOUS`, the same
number of steps each. Reported per model: S(Z) (Liu et al. 2022; evaluation/straightness.py, 100
Euler steps, 2000 noises), and the sliced W2 against 5000 fresh data points of Euler samples at
1, 2 and 4 steps and of dopri5 samples. Costs (CPU seconds of each stage) are printed too.

    python benchmarks/reflow_toy.py                      # moons, ~6 min on 2 cores
    python benchmarks/reflow_toy.py --data checkerboard --steps 3000 --couplings 20000
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

FLOW = ["--process", "flow", "--parametrization", "velocity", "--noise-density", "logit_normal", "--network",
        "mlp-2d", "--class-conditional", "false", "--sample-every", "0", "--threads", "1"]


def _run(args: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run([sys.executable, "-m", "unifusion", *args], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"unifusion {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="moons")
    p.add_argument("--steps", type=int, default=2000, help="training steps of every model")
    p.add_argument("--couplings", type=int, default=10000, help="couplings per reflow")
    p.add_argument("--reflows", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from unifusion import data, models
    from unifusion.evaluation import metrics
    from unifusion.evaluation.straightness import model_straightness
    ref = data.toys.make(args.data, n=5000, seed=999)
    rows = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        prev = tmp / "1rf"
        cost = {"train": _run(["train", "--data", args.data, "--steps", str(args.steps), "--out", str(prev), *FLOW]),
                "couple": 0.0}
        for k in range(args.reflows + 1):
            name = "teacher (1-RF)" if k == 0 else f"{k + 1}-RF"
            model = models.load(prev / "model")
            st = model_straightness(model, n=2000, steps=100)
            row = {"model": name, "S": st["S"], "S_rel": st["S_relative"], "cpu_s": dict(cost)}
            for sampler, nfe in (("euler", 1), ("euler", 2), ("euler", 4), ("dopri5", 200)):
                x = model.sample(seeds=range(5000), sampler=sampler, nfe=nfe, batch_size=5000)
                row[f"{sampler}@{nfe}"] = metrics.sliced_w2(x, ref)
            rows.append(row)
            print(row, flush=True)
            if k == args.reflows:
                break
            pairs = tmp / f"couplings-{k + 1}"
            cost = {"couple": _run(["couple", "--checkpoint", str(prev), "--sampler", "dopri5", "--nfe", "200",
                                    "--n", str(args.couplings), "--out", str(pairs)])}
            nxt = tmp / f"{k + 2}rf"
            cost["train"] = _run(["train", "--data", str(pairs), "--reflow", "true", "--init-from", str(prev / "model"),
                                  "--steps", str(args.steps), "--out", str(nxt), *FLOW])
            prev = nxt
    print(f"\n{args.data}: {args.steps} training steps per model, {args.couplings} dopri5 couplings per reflow; "
          "sliced W2 of 5000 samples against 5000 fresh data points (data vs data: "
          f"{metrics.sliced_w2(data.toys.make(args.data, n=5000, seed=998), ref):.4f})")
    print("| model | S(Z) | S / E|Z1-Z0|^2 | W2 euler 1 | W2 euler 2 | W2 euler 4 | W2 dopri5 | couple CPU-s | train CPU-s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['S']:.4f} | {r['S_rel']:.4f} | {r['euler@1']:.4f} | {r['euler@2']:.4f} | "
              f"{r['euler@4']:.4f} | {r['dopri5@200']:.4f} | {r['cpu_s']['couple']:.0f} | {r['cpu_s']['train']:.0f} |")


if __name__ == "__main__":
    main()
