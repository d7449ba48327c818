"""Calibrated grids and fitted coefficients on exact mixtures, against Karras, `tuned` and the peers.

    .venv/bin/python benchmarks/calibrate_mixtures.py                    # about 30 minutes, one thread
    .venv/bin/python benchmarks/calibrate_mixtures.py --problems "64-D stiff r4" --nfe 5 10 20
    .venv/bin/python benchmarks/calibrate_mixtures.py --compare-methods --problems 2-D 64-D \
        --samplers ipndm dpmpp_2m --nfe 5 10 20                         # gradient vs derivative-free

Problems (PROBLEMS_CAL): the sampler benchmark's two mixtures (evaluation/sampler_bench.py:
GaussianMixture.random(2, 8, seed=0) and (64, 8, seed=1)) and two 64-D mixtures with stiff
directions (GaussianMixture.stiff: rank-4 covariances plus an isotropic floor of 1e-4 of the scale,
seed 21; rank 8 with a floor of 1e-5, seed 22). The 'fitted' sampler was built on another stiff
mixture (seed 20), which none of these is. Validation: randn * 80 in float64 from generator seed 0
(256 noises in 2-D, 4096 in 64-D), sigma 80 -> 0.002 -> 0, error against the exact PF-ODE solution
(DOP853 at 1e-12): RMSE, the median of the samples' own RMS errors, and the "flips", samples more
than 0.1 from their exact solution (they end in another mode; a handful of them dominates the RMSE).

`uf.samplers.calibrate` draws its own fit noises (generator seed 1, n_ref of them) and its own
held-out ones (n_val, from the same stream), solves their reference with dopri5 and fits each
sampler's grid per NFE ('fitted': the grid, then grid and coefficients together), each with a
budget of objective evaluations (not seconds, so a busy machine gives the same result). The
calibrated sampler shown per NFE is the one with the lowest median error on calibrate's own
held-out noises (--pick rmse: lowest RMSE), so the validation noises choose nothing. The peers
(k-diffusion, diffusers; benchmarks/peers.py) run on the validation noises on their Karras grid;
the best of them per NFE is picked by RMSE on those noises (which favours them).
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
from unifusion.evaluation.sampler_bench import SIGMA_MAX, SIGMA_MIN, CountingDenoiser, rmse

SAMPLERS = ("ipndm", "dpmpp_2m", "unipc", "dpmpp_3m", "fitted")
NFES = (5, 8, 10, 15, 20)
FLIP = 0.1  # a final sample this far (RMS per coordinate) from its exact solution ended in another mode

# name -> (mixture, validation noises): the sampler benchmark's two mixtures, then 64-D mixtures with stiff
# directions (rank-r covariances plus a small isotropic floor). GaussianMixture.stiff(64, 8, seed=20) was the
# one used while building the 'fitted' sampler; none of these was.
PROBLEMS_CAL = {
    "2-D": (lambda: GaussianMixture.random(2, 8, seed=0), 256),
    "64-D": (lambda: GaussianMixture.random(64, 8, seed=1), 4096),
    "64-D stiff r4": (lambda: GaussianMixture.stiff(64, 8, seed=21, rank=4, floor=1e-4), 4096),
    "64-D stiff r8": (lambda: GaussianMixture.stiff(64, 8, seed=22, rank=8, floor=1e-5), 4096),
}


def problem(name: str):
    make, batch = PROBLEMS_CAL[name]
    gm = make()
    val = torch.randn(batch, gm.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SIGMA_MAX
    return gm, val, gm.pf_ode(val, SIGMA_MAX, 0.0)


def errors(x, ref) -> dict:
    """RMSE, the median per-sample RMS error and how many samples ended in another mode."""
    e = (x.double() - ref).pow(2).mean(1).sqrt()
    return {"rmse": rmse(x, ref), "median": float(e.median()), "flips": int((e > FLIP).sum())}


def ours(gm, val, ref, sampler, nfe, grid) -> dict:
    return errors(uf.sample(gm.denoise, val, sampler, nfe=nfe, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                            grid=grid), ref)


def peers_table(gm, val, ref, nfes) -> tuple[dict, list[str]]:
    """{nfe: (name, errors)} of the best peer (by RMSE) per NFE, and the peers' notes."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from peers import runners  # benchmarks/peers.py
    runs, notes = runners("karras")
    best = {}
    for n in nfes:
        res = []
        for r in runs:
            counted = CountingDenoiser(gm.denoise)
            with torch.no_grad():
                x = r.run(counted, val.clone(), n)
            if counted.calls > n:
                raise AssertionError(f"{r.name} made {counted.calls} denoiser calls with a budget of {n}")
            e = errors(x, ref)
            if math.isfinite(e["rmse"]):
                res.append((r.name, e))
        best[n] = min(res, key=lambda c: c[1]["rmse"])
    return best, notes


def main_table(args) -> dict:
    out = {}
    for name in args.problems:
        t0 = time.perf_counter()
        gm, val, ref = problem(name)
        nfes = sorted(set(args.nfe) | {20})
        peer, notes = peers_table(gm, val, ref, nfes)
        n_ref = args.n_ref or 256
        print(f"\n## {name}: validation = {len(val)} noises (seed 0); calibrate(n_ref={n_ref}, n_val={args.n_val}, "
              f"seed={args.fit_seed}, method={args.method!r}, max_evals={args.max_evals}, 'fitted' twice that); the "
              f"calibrated sampler per NFE is picked by the {args.pick} error on calibrate's held-out noises", flush=True)
        rows = {}
        print(f"{'sampler':9s} {'NFE':>4} {'karras':>10} {'tuned':>10} {'calibrated':>10} {'cal/tuned':>9} "
              f"{'median':>9} {'flips':>5} {'calibrate held-out':>18} {'evals':>6} {'ref s':>6} {'fit s':>6}  method",
              flush=True)
        for nfe in args.nfe:
            for s in args.samplers:
                cal = uf.samplers.calibrate(gm.denoise, (gm.dim,), s, nfe, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                                            n_ref=n_ref, n_val=args.n_val, seed=args.fit_seed, method=args.method,
                                            max_evals=args.max_evals * (2 if s == "fitted" else 1))
                r = {"karras": ours(gm, val, ref, s, nfe, "karras"), "tuned": ours(gm, val, ref, s, nfe, "tuned"),
                     "calibrated": ours(gm, val, ref, s, nfe, cal), "own_val": cal.rmse_val["calibrated"],
                     "own_median": cal.median_val["calibrated"],
                     "seconds": cal.seconds, "evals": cal.evaluations, "method": cal.method,
                     "sigmas": cal.sigmas.tolist()}
                rows[(s, nfe)] = r
                c = r["calibrated"]
                print(f"{s:9s} {nfe:>4} {r['karras']['rmse']:>10.3e} {r['tuned']['rmse']:>10.3e} {c['rmse']:>10.3e} "
                      f"{c['rmse'] / r['tuned']['rmse']:>9.2f} {c['median']:>9.2e} {c['flips']:>5} {r['own_val']:>18.3e} "
                      f"{r['evals']:>6} {cal.seconds['reference']:>6.1f} {cal.seconds['fit']:>6.1f}  {cal.method}",
                      flush=True)
        print("\nNFE | best peer (Karras grid): RMSE, median, flips | ours tuned | ours calibrated (sampler picked on "
              f"calibrate's held-out {args.pick}): RMSE, median, flips | RMSE / peer | median / peer")
        print("---|---|---|---|---|---")
        summary = {}
        for nfe in args.nfe:
            def best(key, pick=None, nfe=nfe):
                s = min(args.samplers, key=lambda s: rows[(s, nfe)][pick] if pick else rows[(s, nfe)][key]["rmse"])
                return s, rows[(s, nfe)][key]
            t, c = best("tuned"), best("calibrated", pick="own_median" if args.pick == "median" else "own_val")
            p = peer[nfe]
            summary[nfe] = {"peer": p, "tuned": t, "calibrated": c, "ratio": c[1]["rmse"] / p[1]["rmse"],
                            "median_ratio": c[1]["median"] / p[1]["median"]}

            def cell(e):
                return f"{e['rmse']:.2e}, {e['median']:.1e}, {e['flips']}"
            print(f"{nfe} | {p[0]} {cell(p[1])} | {cell(t[1])} ({t[0]}) | {cell(c[1])} ({c[0]}) | "
                  f"{summary[nfe]['ratio']:.2f} | {summary[nfe]['median_ratio']:.2f}")
        if 10 in args.nfe:
            c10, p20 = summary[10]["calibrated"], peer[20]
            ok = c10[1]["rmse"] <= p20[1]["rmse"]
            print(f"moonshot: calibrated NFE 10 {c10[1]['rmse']:.3e} ({c10[0]}) vs best peer NFE 20 "
                  f"{p20[1]['rmse']:.3e} ({p20[0]}): {'reached' if ok else 'not reached'} "
                  f"(ratio {c10[1]['rmse'] / p20[1]['rmse']:.2f})")
        secs = [r["seconds"]["reference"] + r["seconds"]["fit"] for r in rows.values()]
        print(f"calibration seconds (reference + fit) per (sampler, NFE): median {sorted(secs)[len(secs) // 2]:.1f}, "
              f"max {max(secs):.1f}, total {sum(secs):.0f}; section {time.perf_counter() - t0:.0f} s")
        out[name] = {"rows": {f"{s}@{n}": r for (s, n), r in rows.items()}, "summary": summary, "notes": notes}
    return out


def compare_methods(args) -> dict:
    """Gradient (L-BFGS through the differentiable solvers), auto (gradient + Powell polish), Powell, Nelder-Mead;
    the same fit noises and time budget."""
    out = {}
    methods = ("gradient", "auto", "powell", "nelder-mead")
    print(f"\n## gradient vs derivative-free: same fit noises (n_ref {args.n_ref or 256}, seed {args.fit_seed}), "
          f"time budget {args.time_budget} s each, error on the benchmark's validation noises")
    print(f"{'problem':>13} {'sampler':9s} {'NFE':>4} {'tuned':>10} " +
          " ".join(f"{m + ' (s, evals)':>28}" for m in methods))
    for dim in args.problems:
        gm, val, ref = problem(dim)
        for s in args.samplers:
            for nfe in args.nfe:
                cells = []
                for m in methods:
                    cal = uf.samplers.calibrate(gm.denoise, (dim,), s, nfe, n_ref=args.n_ref or 256, n_val=0,
                                                seed=args.fit_seed, method=m, time_budget_s=args.time_budget)
                    e = ours(gm, val, ref, s, nfe, cal)["rmse"]
                    out[f"{dim}/{s}/{nfe}/{m}"] = {"rmse": e, "fit": cal.rmse_fit["calibrated"],
                                                   "seconds": cal.seconds["fit"], "evals": cal.evaluations}
                    cells.append(f"{e:.3e} ({cal.seconds['fit']:4.1f}, {cal.evaluations:5d})")
                print(f"{dim:>13} {s:9s} {nfe:>4} {ours(gm, val, ref, s, nfe, 'tuned')['rmse']:>10.3e} " +
                      " ".join(f"{c:>28}" for c in cells), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", nargs="+", default=list(PROBLEMS_CAL), choices=list(PROBLEMS_CAL))
    p.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    p.add_argument("--n-ref", type=int, default=None, help="fit noises per calibration (default 256)")
    p.add_argument("--n-val", type=int, default=1024,
                   help="calibrate's own held-out noises, which pick the sampler per NFE (with 128, one trajectory "
                        "that ends in another mode decides the pick)")
    p.add_argument("--fit-seed", type=int, default=1, help="calibrate's seed (the validation noises use seed 0)")
    p.add_argument("--method", default="auto")
    p.add_argument("--time-budget", type=float, default=8.0, help="--compare-methods: seconds of fitting per calibration")
    p.add_argument("--max-evals", type=int, default=300,
                   help="objective evaluations per calibration ('fitted': twice, half for its grid, half for grid + "
                        "coefficients); a count, not seconds, so that a busy machine gives the same grids")
    p.add_argument("--pick", choices=("median", "rmse"), default="median",
                   help="how the calibrated sampler per NFE is picked on calibrate's held-out noises: by the median "
                        "per-sample error (default: the typical accuracy; the RMSE of 1024 noises moves with the one or "
                        "two trajectories that end in another mode) or by RMSE")
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
