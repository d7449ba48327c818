"""Normalizing flows beside diffusion, at equal CPU budget: bits/dim and sample quality.

Every family trains through the same CLI (`unifusion train --family ...`) for the same CPU time
(the step count comes from a timed pilot of each family, so fast and slow models get the same
seconds), unconditionally, one thread, one job at a time. Then, in this process:

  digits (8x8, 17 levels, uniform dequantization: likelihood.py's one convention)
    bits/dim   on the 297 held-out images: exact for the coupling flows, the PF-ODE (RK45 at
               1e-5, Hutchinson, one probe) for the CNF, flow matching and EDM; and on the first
               297 training images (the generalisation gap: digits has only 1,500 training images)
    FID, precision, recall  of 1000 samples in the shipped digits classifier's feature space
    confident  share of samples the shipped classifier gives one class >= 0.9 probability
               (a class-free stand-in for accuracy; the held-out images score the reference)
    train CPU-min, ms/image to sample
  gmm toy (2-D, 8 Gaussians, continuous: no dequantization)
    NLL (nats) on 5000 fresh points against the true density's (the entropy), and the
    sliced W2 of 5000 samples against 5000 fresh data points

    python benchmarks/flows.py                 # ~40 min on 2 cores
    python benchmarks/flows.py --budget 30 --toy-budget 10 --n 300    # a quick look
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tables import table  # benchmarks/tables.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--class-conditional", "false", "--sample-every", "0", "--threads", "1", "--checkpoint-every", "100000",
          "--log-every", "50"]

DIGITS = [  # (row, flags)
    ("NICE", ["--family", "flow-nice", "--lr", "1e-3"]),
    ("RealNVP", ["--family", "flow-realnvp", "--lr", "1e-3"]),
    ("Glow", ["--family", "flow-glow", "--lr", "1e-3"]),
    ("CNF (max. likelihood)", ["--family", "cnf", "--process", "flow", "--parametrization", "velocity",
                               "--ode-steps", "4", "--batch-size", "64", "--lr", "1e-3"]),
    ("flow matching", ["--process", "flow", "--parametrization", "velocity", "--noise-density", "logit_normal"]),
    ("EDM diffusion", []),
]
TOY = [
    ("NICE", ["--family", "flow-nice", "--lr", "1e-3"]),
    ("RealNVP", ["--family", "flow-realnvp", "--lr", "1e-3"]),
    ("Glow", ["--family", "flow-glow", "--lr", "1e-3"]),
    ("CNF (max. likelihood)", ["--family", "cnf", "--process", "flow", "--parametrization", "velocity",
                               "--network", "mlp-2d", "--ode-steps", "8", "--lr", "1e-3"]),
    ("flow matching", ["--process", "flow", "--parametrization", "velocity", "--noise-density", "logit_normal",
                       "--network", "mlp-2d"]),
    ("EDM diffusion", ["--network", "mlp-2d"]),
]


def _train(data: str, flags: list[str], out: Path, steps: int) -> float:
    """Run `unifusion train`; returns the child's CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    warmup = str(min(200, steps // 10))
    cmd = [sys.executable, "-m", "unifusion", "train", "--data", data, "--out", str(out), "--overwrite",
           "--steps", str(steps), "--warmup-steps", warmup, *COMMON, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _steps_for(data: str, flags: list[str], budget: float, tmp: Path) -> tuple[int, float]:
    """Steps that fit `budget` CPU seconds. Pilots of 8 and 8 + k steps: their CPU-time difference
    removes start-up, data loading and the final outputs; k is first 16, then sized to give about
    15 CPU seconds of signal (a short pilot overestimates fast models' step time)."""
    a = _train(data, flags, tmp / "pilot-a", 8)
    per_step = max((_train(data, flags, tmp / "pilot-b", 24) - a) / 16, 1e-3)
    k = int(min(600, max(16, 15 / per_step)))
    if k > 16:
        per_step = max((_train(data, flags, tmp / "pilot-b", 8 + k) - a) / k, 1e-3)
    return max(20, int(budget / per_step)), per_step


def _confident(x: torch.Tensor, extractor) -> float:
    p = torch.cat([extractor.logits(x[i:i + 500]).softmax(1) for i in range(0, len(x), 500)])
    return float((p.max(1).values >= 0.9).double().mean())


def digits_rows(budget: float, n: int, tmp: Path, keep: Path | None) -> list[dict]:
    from unifusion import models
    from unifusion.evaluation import evaluate as E
    from unifusion.evaluation import features as fx
    extractor = fx.digits_features()
    ref = E.reference("digits-train", {}, extractor, tmp / "ref")
    rows = [{"row": "held-out data", "confident": _confident(ref.held_out.x, extractor)}]
    for name, flags in DIGITS:
        steps, per_step = _steps_for("digits-train", flags, budget, tmp)
        out = (keep or tmp) / f"digits-{name.split()[0].lower()}"
        cpu = _train("digits-train", flags, out, steps)
        model = models.load(out / "model")
        torch.set_num_threads(1)
        row = E.evaluate(model, ref, "dpmpp_2m", 20, n, batch_size=500)
        x = model.sample(seeds=range(n), sampler="dpmpp_2m", nfe=20, batch_size=500)
        t0 = time.process_time()
        r = E.nll(model, ref.held_out, len(ref.held_out), probes=1)
        nll_s = time.process_time() - t0
        r_train = E.nll(model, ref.train, len(ref.held_out), probes=1)  # the generalisation gap
        rows.append({"row": name, "steps": steps, "ms_per_step": round(1000 * per_step, 1),
                     "train_cpu_min": round(cpu / 60, 2), "bits_per_dim": r["bits_per_dim"], "bpd_se": r["stderr"],
                     "train_bpd": r_train["bits_per_dim"],
                     "nll_cpu_s": round(nll_s, 1), "fid": row.fid, "precision": row.precision, "recall": row.recall,
                     "copy_rate": row.copy_rate, "confident": _confident(x, extractor),
                     "ms_per_image": round(1000 * row.seconds / n, 3), "sampling": "inverse" if model.one_pass
                     else "dpmpp_2m, 20 NFE"})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def toy_rows(budget: float, tmp: Path) -> list[dict]:
    from unifusion import data, models
    from unifusion.evaluation import metrics
    from unifusion.evaluation.mixture import GaussianMixture
    k = torch.arange(8, dtype=torch.float64)
    means = 0.7 * torch.stack([(2 * math.pi * k / 8).cos(), (2 * math.pi * k / 8).sin()], 1)
    true = GaussianMixture(torch.full((8,), 1 / 8, dtype=torch.float64), means,
                           0.05**2 * torch.eye(2, dtype=torch.float64).repeat(8, 1, 1))
    test = data.toys.make("gmm", n=5000, seed=123).double()
    ref = data.toys.make("gmm", n=5000, seed=456).double()
    entropy = float(-true.log_prob(test).mean())
    rows = [{"row": "true density", "nll_nats": entropy, "sliced_w2": metrics.sliced_w2(test, ref)}]
    for name, flags in TOY:
        steps, per_step = _steps_for("gmm", flags, budget, tmp)
        out = tmp / f"toy-{name.split()[0].lower()}"
        cpu = _train("gmm", flags, out, steps)
        model = models.load(out / "model")
        lp = model.log_likelihood(test, divergence="exact", rtol=1e-5, atol=1e-5)
        x = model.sample(seeds=range(5000), sampler="dpmpp_2m", nfe=20, batch_size=5000)
        rows.append({"row": name, "steps": steps, "train_cpu_min": round(cpu / 60, 2),
                     "nll_nats": float(-lp.mean()), "sliced_w2": metrics.sliced_w2(x, ref)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def time_sampling(folder: Path) -> None:
    """ms/image of the kept digits runs (--keep), on an idle machine: best of 3 x 1000 images."""
    from unifusion import models
    for run in sorted(Path(folder).glob("digits-*")):
        model = models.load(run / "model")
        model.sample(seeds=range(100), nfe=20, batch_size=500)  # warm-up
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            model.sample(seeds=range(1000), sampler="dpmpp_2m", nfe=20, batch_size=500)
            best = min(best, time.perf_counter() - t)
        print(f"{run.name}: {best:.3f} ms/image (best of 3 x 1000 images, batch 500, 1 thread)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=180, help="training CPU seconds per digits model")
    p.add_argument("--toy-budget", type=float, default=45, help="training CPU seconds per toy model")
    p.add_argument("--n", type=int, default=1000, help="samples per digits model")
    p.add_argument("--keep", default=None, help="keep the digits runs in this folder")
    p.add_argument("--skip-toy", action="store_true")
    p.add_argument("--skip-digits", action="store_true")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--time-sampling", default=None, metavar="DIR",
                   help="only re-time sampling of the digits runs kept in DIR (by --keep), then exit")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.time_sampling:
        return time_sampling(Path(args.time_sampling))
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        keep = Path(args.keep) if args.keep else None
        d = [] if args.skip_digits else digits_rows(args.budget, args.n, tmp, keep)
        toy = [] if args.skip_toy else toy_rows(args.toy_budget, tmp)
    if d:
        print(f"\ndigits, {args.budget:.0f} CPU-s of training each (1 thread), {args.n} samples, 297 held-out images")
        print(table(d, [("row", "model", 0), ("bits_per_dim", "bits/dim", 3), ("bpd_se", "+-", 3),
                        ("train_bpd", "train bits/dim", 3), ("fid", "FID", 3),
                    ("precision", "precision", 3), ("recall", "recall", 3), ("confident", "confident", 3),
                    ("copy_rate", "copy", 3), ("steps", "steps", 0), ("ms_per_step", "ms/step", 1),
                    ("train_cpu_min", "train CPU-min", 2), ("ms_per_image", "ms/image", 3),
                    ("sampling", "sampling", 0)]))
    if toy:
        print(f"\ngmm toy, {args.toy_budget:.0f} CPU-s of training each, 5000 test points / samples")
        print(table(toy, [("row", "model", 0), ("nll_nats", "NLL (nats)", 3), ("sliced_w2", "sliced W2", 4),
                          ("steps", "steps", 0), ("train_cpu_min", "train CPU-min", 2)]))
    if args.json:
        Path(args.json).write_text(json.dumps({"digits": d, "toy": toy}, indent=1))


if __name__ == "__main__":
    main()
