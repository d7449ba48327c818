"""Calibrated grids on the sampler benchmark's exact mixtures, against Karras, `tuned` and the peers.

    .venv/bin/python benchmarks/calibrate_mixtures.py                    # about 4 minutes on 2 cores
    .venv/bin/python benchmarks/calibrate_mixtures.py --compare-methods \
        --samplers ipndm dpmpp_2m --nfe 5 10 20                         # gradient vs derivative-free, 5 min

The problems are the sampler benchmark's (evaluation/sampler_bench.py): GaussianMixture.random(2, 8,
seed=0) and (64, 8, seed=1), noise = randn * 80 in float64 from generator seed 0 (batch 256 / 128),
sigma 80 -> 0.002 -> 0, error = RMSE against the exact PF-ODE solution (DOP853 at 1e-12). Those
noises are the validation set here: `uf.samplers.calibrate` draws its own fit noises (generator
seed 1, n_ref of them) and its own held-out ones (n_val, from the same stream), solves their
reference with dopri5 and fits each sampler's grid per NFE. The calibrated sampler shown per NFE is
the one with the lowest error on calibrate's own held-out noises, so the benchmark's validation
noises choose nothing. The peers (k-diffusion, diffusers; benchmarks/peers.py) run on the validation
noises on their Karras grid; the best of them per NFE is picked on those noises (which favours them).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

import unifusion as uf
from unifusion.evaluation.mixture import GaussianMixture
from unifusion.evaluation.sampler_bench import PROBLEMS, SIGMA_MAX, SIGMA_MIN, run_one, rmse

SAMPLERS = ("ipndm", "dpmpp_2m", "unipc", "dpmpp_3m")
NFES = (5, 8, 10, 15, 20)


def problem(dim: int):
    seed, batch = PROBLEMS[dim]
    gm = GaussianMixture.random(dim, 8, seed=seed)
    val = torch.randn(batch, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SIGMA_MAX
    return gm, val, gm.pf_ode(val, SIGMA_MAX, 0.0)


def ours(gm, val, ref, sampler, nfe, grid) -> float:
    return rmse(uf.sample(gm.denoise, val, sampler, nfe=nfe, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, grid=grid), ref)


def peers_table(gm, val, ref, nfes) -> tuple[dict, list[str]]:
    """{nfe: (name, rmse)} of the best peer per NFE, and the peers' notes."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from peers import runners  # benchmarks/peers.py
    runs, notes = runners("karras")
    best = {}
    for n in nfes:
        res = [(r.name, run_one(r, gm, val, ref, n).rmse) for r in runs]
        best[n] = min((c for c in res if math.isfinite(c[1])), key=lambda c: c[1])
    return best, notes


def main_table(args) -> dict:
    out = {}
    for dim in args.dims:
        t0 = time.perf_counter()
        gm, val, ref = problem(dim)
        nfes = sorted(set(args.nfe) | {20})
        peer, notes = peers_table(gm, val, ref, nfes)
        n_ref = args.n_ref or 256
        print(f"\n## {dim}-D: GaussianMixture.random({dim}, 8, seed={PROBLEMS[dim][0]}), validation = the sampler "
              f"benchmark's {len(val)} noises; calibrate(n_ref={n_ref}, n_val={args.n_val}, seed={args.fit_seed}, "
              f"method={args.method!r}, time_budget_s={args.time_budget})", flush=True)
        rows, cals = {}, {}
        print(f"{'sampler':9s} {'NFE':>4} {'karras':>10} {'tuned':>10} {'calibrated':>10} {'cal/tuned':>9} "
              f"{'calibrate held-out':>18} {'evals':>6} {'ref s':>6} {'fit s':>6}  method", flush=True)
        for nfe in args.nfe:
            for s in args.samplers:
                cal = uf.samplers.calibrate(gm.denoise, (dim,), s, nfe, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                                            n_ref=n_ref, n_val=args.n_val, seed=args.fit_seed, method=args.method,
                                            time_budget_s=args.time_budget)
                r = {"karras": ours(gm, val, ref, s, nfe, "karras"), "tuned": ours(gm, val, ref, s, nfe, "tuned"),
                     "calibrated": ours(gm, val, ref, s, nfe, cal), "own_val": cal.rmse_val["calibrated"],
                     "seconds": cal.seconds, "evals": cal.evaluations, "method": cal.method,
                     "sigmas": cal.sigmas.tolist()}
                rows[(s, nfe)], cals[(s, nfe)] = r, cal
                print(f"{s:9s} {nfe:>4} {r['karras']:>10.3e} {r['tuned']:>10.3e} {r['calibrated']:>10.3e} "
                      f"{r['calibrated'] / r['tuned']:>9.2f} {r['own_val']:>18.3e} {r['evals']:>6} "
                      f"{cal.seconds['reference']:>6.1f} {cal.seconds['fit']:>6.1f}  {cal.method}", flush=True)
        print("\nNFE | best peer (Karras grid) | ours karras | ours tuned | ours calibrated (sampler, picked on "
              "calibrate's held-out) | calibrated / best peer")
        print("---|---|---|---|---|---")
        summary = {}
        for nfe in args.nfe:
            def best(key, pick=None):
                name = min(args.samplers, key=lambda s: rows[(s, nfe)][pick or key])
                return name, rows[(name, nfe)][key]
            k, t, c = best("karras"), best("tuned"), best("calibrated", pick="own_val")
            p = peer[nfe]
            summary[nfe] = {"peer": p, "karras": k, "tuned": t, "calibrated": c, "ratio": c[1] / p[1]}
            print(f"{nfe} | {p[0]} {p[1]:.3e} | {k[1]:.3e} ({k[0]}) | {t[1]:.3e} ({t[0]}) | {c[1]:.3e} ({c[0]}) | "
                  f"{c[1] / p[1]:.2f}")
        if 10 in args.nfe:
            c10, p20 = summary[10]["calibrated"], peer[20]
            print(f"moonshot: calibrated NFE 10 {c10[1]:.3e} ({c10[0]}) vs best peer NFE 20 {p20[1]:.3e} ({p20[0]}): "
                  f"{'reached' if c10[1] <= p20[1] else 'not reached'} (ratio {c10[1] / p20[1]:.2f})")
        secs = [r["seconds"]["reference"] + r["seconds"]["fit"] for r in rows.values()]
        print(f"calibration seconds (reference + fit) per (sampler, NFE): median {sorted(secs)[len(secs) // 2]:.1f}, "
              f"max {max(secs):.1f}, total {sum(secs):.0f}; {dim}-D section {time.perf_counter() - t0:.0f} s")
        out[dim] = {"rows": {f"{s}@{n}": r for (s, n), r in rows.items()}, "summary": summary, "notes": notes}
    return out


def compare_methods(args) -> dict:
    """Gradient (L-BFGS through the differentiable solvers), auto (gradient + Powell polish), Powell, Nelder-Mead;
    the same fit noises and time budget."""
    out = {}
    methods = ("gradient", "auto", "powell", "nelder-mead")
    print(f"\n## gradient vs derivative-free: same fit noises (n_ref {args.n_ref or 256}, seed {args.fit_seed}), "
          f"time budget {args.time_budget} s each, error on the benchmark's validation noises")
    print(f"{'dim':>3} {'sampler':9s} {'NFE':>4} {'tuned':>10} " +
          " ".join(f"{m + ' (s, evals)':>28}" for m in methods))
    for dim in args.dims:
        gm, val, ref = problem(dim)
        for s in args.samplers:
            for nfe in args.nfe:
                cells = []
                for m in methods:
                    cal = uf.samplers.calibrate(gm.denoise, (dim,), s, nfe, n_ref=args.n_ref or 256, n_val=0,
                                                seed=args.fit_seed, method=m, time_budget_s=args.time_budget)
                    e = ours(gm, val, ref, s, nfe, cal)
                    out[f"{dim}/{s}/{nfe}/{m}"] = {"rmse": e, "fit": cal.rmse_fit["calibrated"],
                                                   "seconds": cal.seconds["fit"], "evals": cal.evaluations}
                    cells.append(f"{e:.3e} ({cal.seconds['fit']:4.1f}, {cal.evaluations:5d})")
                print(f"{dim:>3} {s:9s} {nfe:>4} {ours(gm, val, ref, s, nfe, 'tuned'):>10.3e} " +
                      " ".join(f"{c:>28}" for c in cells), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 64], choices=sorted(PROBLEMS))
    p.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    p.add_argument("--n-ref", type=int, default=None, help="fit noises per calibration (default 256)")
    p.add_argument("--n-val", type=int, default=512,
                   help="calibrate's own held-out noises, which pick the sampler per NFE (with 128, one trajectory "
                        "that ends in another mode decides the pick)")
    p.add_argument("--fit-seed", type=int, default=1, help="calibrate's seed (the validation noises use seed 0)")
    p.add_argument("--method", default="auto")
    p.add_argument("--time-budget", type=float, default=8.0, help="seconds of fitting per calibration")
    p.add_argument("--compare-methods", action="store_true", help="gradient vs powell vs nelder-mead instead")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench/calibrate_mixtures.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"# calibrated grids on exact mixtures; torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"{torch.get_num_threads()} thread(s)")
    result = compare_methods(args) if args.compare_methods else main_table(args)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    from unifusion.safeio import atomic_write
    atomic_write(args.out, json.dumps(result, indent=1, default=str))
    print(f"\nwrote {args.out}; total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
