"""How each process's default sampling grid, sampler and NFE are chosen (issue 24): held-out exact
mixtures, then models trained on moons through the CLI; and whether `train --calibrate` should be
on by default.

Part 1, exact mixtures. For every process on its own range (sigma_max -> sigma_min -> 0; flow from
sigma_max = inf, its reference solved from sigma = 1e4 with x = E[x_0] + 1e4 n, whose error at the
end is O(1e-8)), every deterministic sampler (euler, heun, dpmpp_2m, dpmpp_3m, ipndm, unipc) on
every grid at NFE 10 and 20 is scored by its RMSE against the exact PF-ODE solution (DOP853 at
1e-12) on mixtures that no other benchmark or default was tuned on: 2-D (8 components, seeds 11 and
12), 64-D (seed 13), and a *stiff* 64-D mixture (each component a rank-4 covariance plus an
isotropic floor of 1e-4 of its scale: directions of very small variance). A candidate's score is the
geometric mean, over problems and NFEs, of its error over the best candidate's on that problem and
NFE (1.0 = best everywhere). The grid (per process, with dpmpp_2m) was chosen here; flow keeps its
native uniform-t grid (it starts at sigma = inf, where only uniform_t / sd3 exist).

Part 2, trained toys. Each process trained on moons through `unifusion train` (its usual
parametrization and training density, 3000 steps of batch 256, one thread), then sampled (4000
seeds) with every candidate sampler on the process's default grid at NFE 10 and 20: sliced W2 to
4000 fresh moons points, against the data-vs-data floor (two fresh sets of 4000).

The sampler. Per process, on its default grid, each sampler's cells are the 8 mixture cells of part 1
and the 2 moons cells of part 2 (moons counts as one more problem); its ratio in a cell is its error
(RMSE; sliced W2 on moons) over the best sampler's there. The default is the sampler with the lowest
geometric-mean ratio among those whose worst ratio is at most WORST_BAR (robustness first: the
numbers are re-measured on other problems, so a sampler that wins on average but fails on one
problem is not a default). The NFE: the smallest of NFE 10 and 20 whose moons W2 is within
NFE_SLACK of NFE 20's with that sampler. Regression bar: every process within 2.5x the data floor
on moons with its defaults.

Part 3 (--calibration), is calibrating worth it by default? Each process trained again on moons with
today's defaults (CPU seconds of the training process), then `train --resume --calibrate` fits the
default (sampler, NFE)'s grid: its CPU seconds minus those of a plain `train --resume` (the final
outputs both write) are the calibration's cost, set against the training's; the gain is sliced W2 / floor of the default
sampling without and with the calibrated grid. --digits adds the default digits run (EDM, 2400
steps) with FID on 1500 samples (digits-CNN features; seed noise std about 0.006).

    python benchmarks/defaults.py                          # parts 1 and 2, about 10 minutes
    python benchmarks/defaults.py --skip-train             # part 1 only
    python benchmarks/defaults.py --calibration --digits   # parts 1-3, about 45 minutes more
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_runs import QUIET, cli_cpu  # noqa: E402
from tables import table  # noqa: E402

import unifusion as uf  # noqa: E402
from unifusion import processes  # noqa: E402
from unifusion.evaluation.metrics import sliced_w2  # noqa: E402
from unifusion.evaluation.mixture import GaussianMixture  # noqa: E402
from unifusion.samplers import grids as G  # noqa: E402

SAMPLERS = ("euler", "heun", "dpmpp_2m", "dpmpp_3m", "ipndm", "unipc")  # the deterministic candidates
GRIDS = ("native", "karras", "tuned", "loglinear")
FLOW_GRIDS = ("native", "sd3")  # from sigma = inf
NFES = (10, 20)
WORST_BAR = 3.0   # a default sampler is at most this many times the best one's error on any problem
NFE_SLACK = 1.10  # the smaller NFE if its moons W2 is within this factor of NFE 20's
INF_START = 1e4   # where flow's exact reference starts (x = E[x_0] + INF_START n)
FLOOR_BAR = 2.5
RECIPES = {  # process -> its usual parametrization and training density (the papers')
    "edm": ["--parametrization", "edm", "--noise-density", "lognormal"],
    "ve": ["--parametrization", "eps", "--noise-density", "uniform_t"],
    "vp": ["--parametrization", "eps", "--noise-density", "uniform_t"],
    "subvp": ["--parametrization", "eps", "--noise-density", "uniform_t"],
    "ddpm": ["--parametrization", "eps", "--noise-density", "discrete"],
    "flow": ["--parametrization", "velocity", "--noise-density", "uniform_t"],
}


def problems() -> list[tuple[str, GaussianMixture, int]]:
    return [("2-D seed 11", GaussianMixture.random(2, 8, seed=11), 256),
            ("2-D seed 12", GaussianMixture.random(2, 8, seed=12), 256),
            ("64-D seed 13", GaussianMixture.random(64, 8, seed=13), 96),
            ("64-D stiff", GaussianMixture.stiff(64, 8, seed=14), 96)]  # rank 4 + a 1e-4 floor


def sampling_range(pname: str) -> tuple[float, float]:
    """A new model's range (models/diffusion.py): the process's own, flow down to 0.002."""
    lo, hi = processes.PROCESSES[pname]().sigma_range()
    return (lo if lo > 0 else 0.002), hi


def default_grid(pname: str) -> str:
    """The grid a new model of this process gets (--grid auto)."""
    proc = processes.PROCESSES[pname]()
    hi = sampling_range(pname)[1]
    return proc.default_grid if not math.isinf(hi) or proc.default_grid in G.FROM_INF else "native"


def part_mixtures() -> dict:
    """{process: {"range": [lo, hi], "errs": {"sampler/grid": [RMSE per (problem, NFE)]}}}."""
    probs = problems()
    out = {}
    for pname in RECIPES:
        proc = processes.PROCESSES[pname]()
        lo, hi = sampling_range(pname)
        inf = math.isinf(hi)
        errs: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        for i, (label, gm, batch) in enumerate(probs):
            n = torch.randn(batch, gm.dim, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
            x = n if inf else n * hi
            ref = gm.pf_ode(gm.mean() + INF_START * n, INF_START, 0.0) if inf else gm.pf_ode(x, hi, 0.0)
            for sampler, grid in itertools.product(SAMPLERS, FLOW_GRIDS if inf else GRIDS):
                for nfe in NFES:
                    out_x = uf.sample(gm.denoise, x, sampler, nfe=nfe, sigma_min=lo, sigma_max=hi, grid=grid,
                                      process=proc)
                    e = float(((out_x - ref) ** 2).mean().sqrt())
                    errs.setdefault(f"{sampler}/{grid}", []).append(e if math.isfinite(e) else math.inf)
        out[pname] = {"range": [lo, hi if not inf else "inf"], "errs": errs}
        print(f"part 1: {pname} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def ratios(errs: dict[str, list[float]], keys) -> dict[str, list[float]]:
    """Each candidate's error over the best candidate's (among `keys`), per cell."""
    keys = list(keys)
    cells = len(errs[keys[0]])
    best = [min(errs[k][c] for k in keys) for c in range(cells)]
    return {k: [errs[k][c] / best[c] for c in range(cells)] for k in keys}


def gmean(v: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in v) / len(v)) if all(math.isfinite(x) for x in v) else math.inf


def grid_rows(mix: dict) -> tuple[dict, list[dict]]:
    """The grid table of part 1: per process the top 3 (sampler, grid), then dpmpp_2m on native and on
    its best grid; and dpmpp_2m's best grid per process."""
    probs = [p[0] for p in problems()]
    rows, choice = [], {}
    for pname, rec in mix.items():
        errs = rec["errs"]
        r = ratios(errs, errs)
        score = {k: gmean(v) for k, v in r.items()}
        ranked = sorted(score, key=score.get)
        grids = FLOW_GRIDS if rec["range"][1] == "inf" else GRIDS
        best = min(grids, key=lambda g: score[f"dpmpp_2m/{g}"])
        choice[pname] = best
        for k in dict.fromkeys(ranked[:3] + ["dpmpp_2m/native", f"dpmpp_2m/{best}"]):
            sampler, grid = k.split("/")
            row = {"process": pname, "range": "{:.3g}-{}".format(rec["range"][0], rec["range"][1] if
                                                                  isinstance(rec["range"][1], str) else
                                                                  f"{rec['range'][1]:.3g}"),
                   "sampler": sampler, "grid": grid, "score": score[k], "rank": ranked.index(k) + 1}
            for c, (label, nfe) in enumerate(itertools.product(probs, NFES)):
                row[f"{label} @{nfe}"] = f"{errs[k][c]:.2e}"
            rows.append(row)
    return choice, rows


def part_moons(out: Path, steps: int, n: int) -> tuple[float, dict]:
    """(data floor, {process: {"sampler/grid@nfe": sliced W2}}): every candidate on the process's
    default grid, and dpmpp_2m on native (the defaults before issue 24)."""
    fresh = lambda seed: uf.data.load("moons", n=n, seed=seed).x  # noqa: E731
    floor = sliced_w2(fresh(1001), fresh(1002))
    test = fresh(1003)
    w2 = {}
    for pname, recipe in RECIPES.items():
        run = out / pname
        if not (run / "model" / "spec.json").is_file():
            cli_cpu(["train", "--data", "moons", "--process", pname, *recipe, "--grid", "native", "--steps",
                     str(steps), "--batch-size", "256", "--out", str(run), "--overwrite", *QUIET])
        model = uf.models.load(run)
        grid = default_grid(pname)
        cands = [(s, grid) for s in SAMPLERS] + ([("dpmpp_2m", "native")] if grid != "native" else [])
        w2[pname] = {}
        for (sampler, g), nfe in itertools.product(cands, NFES):
            x = model.sample(seeds=range(n), sampler=sampler, nfe=nfe, grid=g)
            w2[pname][f"{sampler}/{g}@{nfe}"] = sliced_w2(x, test)
    return floor, w2


def choose_samplers(mix: dict, moons: dict | None, floor: float | None) -> tuple[dict, list[dict]]:
    """{process: (sampler, nfe)} by the rule of the module docstring, and the table rows."""
    chosen, rows = {}, []
    for pname, rec in mix.items():
        grid = default_grid(pname)
        errs = {s: list(rec["errs"][f"{s}/{grid}"]) for s in SAMPLERS}
        if moons is not None:
            for s in SAMPLERS:
                errs[s] += [moons[pname][f"{s}/{grid}@{nfe}"] for nfe in NFES]
        r = ratios(errs, SAMPLERS)
        score = {s: gmean(v) for s, v in r.items()}
        worst = {s: max(v) for s, v in r.items()}
        robust = [s for s in SAMPLERS if worst[s] <= WORST_BAR]
        pick = min(robust, key=score.get) if robust else min(SAMPLERS, key=worst.get)
        nfe = max(NFES)
        if moons is not None:
            top = moons[pname][f"{pick}/{grid}@{max(NFES)}"]
            nfe = min(k for k in NFES if moons[pname][f"{pick}/{grid}@{k}"] <= NFE_SLACK * top)
        chosen[pname] = (pick, nfe)
        for s in sorted(SAMPLERS, key=score.get):
            row = {"process": pname, "grid": grid, "sampler": s, "score": score[s], "worst": worst[s],
                   "mixtures": gmean(r[s][:8]), "worst mixture": max(r[s][:8]),
                   "chosen": "**default**" if s == pick else ""}
            if moons is not None:
                row.update({f"moons @{k} x floor": moons[pname][f"{s}/{grid}@{k}"] / floor for k in NFES})
            rows.append(row)
    return chosen, rows


def old_vs_new(moons: dict, floor: float, chosen: dict) -> list[dict]:
    """Moons with the defaults before issue 24 (dpmpp_2m, native, 20), with the default grid only
    (dpmpp_2m, 20), and with the per-process default (sampler, NFE) on that grid."""
    rows = []
    for pname in RECIPES:
        grid, (s, k) = default_grid(pname), chosen[pname]
        w = moons[pname]
        rows.append({"process": pname, "before (dpmpp_2m native 20)": w["dpmpp_2m/native@20"] / floor,
                     "default grid (dpmpp_2m 20)": w[f"dpmpp_2m/{grid}@20"] / floor,
                     "default": f"{s} {grid} {k}", "x floor": w[f"{s}/{grid}@{k}"] / floor,
                     "at NFE 10": w[f"{s}/{grid}@10"] / floor,
                     "dpmpp_2m at NFE 10": w[f"dpmpp_2m/{grid}@10"] / floor})
    return rows


# ------------------------------------------------------------------------------ part 3
def part_calibration(out: Path, steps: int, n: int, digits: bool) -> list[dict]:
    """Cost and gain of `train --calibrate` on the six moons processes (and the digits default)."""
    fresh = lambda seed: uf.data.load("moons", n=n, seed=seed).x  # noqa: E731
    floor = sliced_w2(fresh(1001), fresh(1002))
    test = fresh(1003)
    rows = []
    jobs = [(p, ["--data", "moons", "--process", p, *RECIPES[p], "--steps", str(steps), "--batch-size", "256"])
            for p in RECIPES]
    if digits:
        jobs.append(("digits edm", []))  # the default run: digits, EDM, 2400 steps
    done_path = out / "calibration.json"
    done = json.loads(done_path.read_text()) if done_path.is_file() else {}
    for name, train in jobs:
        if name in done:
            rows.append(done[name])
            continue
        run = out / ("calibrated-" + name.replace(" ", "-"))
        t_train = cli_cpu(["train", *train, "--out", str(run), "--overwrite", *QUIET])
        t_resume = cli_cpu(["train", "--out", str(run), "--resume", *QUIET])
        t_cal = cli_cpu(["train", "--out", str(run), "--resume", "--calibrate", *QUIET])
        t_again = cli_cpu(["train", "--out", str(run), "--resume", "--calibrate", *QUIET])  # skipped: same weights
        model = uf.models.load(run)
        sampler, nfe = model.spec.sampling_defaults()
        cal = model.spec.calibration(sampler, nfe)
        if cal is None:  # train --calibrate printed why (e.g. a reference solve that did not converge)
            row = {"model": name, "default": f"{sampler} {model.spec.grid['name']} {nfe}", "train CPU s": t_train,
                   "calibrate CPU s": t_cal - t_resume, "calibration / training": (t_cal - t_resume) / t_train,
                   "metric": "not calibrated"}
            rows.append(row)
            done[name] = row
            done_path.write_text(json.dumps(done, indent=1))
            continue
        row = {"model": name, "default": f"{sampler} {model.spec.grid['name']} {nfe}", "train CPU s": t_train,
               "calibrate CPU s": t_cal - t_resume, "calibration / training": (t_cal - t_resume) / t_train,
               "calibration wall s": cal.seconds["total"], "skip CPU s": t_again - t_resume,
               "held-out RMSE x": cal.rmse_val["calibrated"] / min(v for k, v in cal.rmse_val.items()
                                                                    if k != "calibrated")}
        if name == "digits edm":
            fid = {}
            for label, extra in (("default", []), ("calibrated", ["--grid", "calibrated"])):
                ev = run / f"eval-{label}"
                grid = [] if extra else ["--grid", model.spec.grid["name"]]
                cli_cpu(["eval", "--checkpoint", str(run), "--n", "1500", "--out", str(ev), *grid, *extra])
                fid[label] = json.loads((ev / "eval.json").read_text())["rows"][0]["fid"]
            row.update({"metric": "FID", "default only": fid["default"], "default + calibrated": fid["calibrated"]})
        else:
            with torch.no_grad():
                plain = model.sample(seeds=range(n), sampler=sampler, nfe=nfe, grid=model.spec.grid["name"])
                calibrated = model.sample(seeds=range(n))  # no sampler, no grid: the default, calibrated
            row.update({"metric": "W2/floor", "default only": sliced_w2(plain, test) / floor,
                        "default + calibrated": sliced_w2(calibrated, test) / floor})
        rows.append(row)
        done[name] = row
        done_path.write_text(json.dumps(done, indent=1))
        print(json.dumps(row), flush=True)
    return rows


def w2_noise(run: Path, n: int, blocks: int = 4) -> dict[str, list[float]]:
    """The seed noise of the moons numbers, in units of the floor: sliced W2 of `blocks` other pairs of
    fresh data sets, and of a model's default sampling without and with its calibrated grid on `blocks`
    disjoint seed blocks of n (the two share their seeds: a paired comparison)."""
    fresh = lambda seed: uf.data.load("moons", n=n, seed=seed).x  # noqa: E731
    floor, test = sliced_w2(fresh(1001), fresh(1002)), fresh(1003)
    model = uf.models.load(run)
    out = {"data vs data": [sliced_w2(fresh(2000 + b), fresh(3000 + b)) / floor for b in range(blocks)],
           "default": [], "default + calibrated": []}
    with torch.no_grad():
        for b in range(blocks):
            seeds = range(b * n, (b + 1) * n)
            out["default"].append(sliced_w2(model.sample(seeds=seeds, grid=model.spec.grid["name"]), test) / floor)
            out["default + calibrated"].append(sliced_w2(model.sample(seeds=seeds), test) / floor)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/defaults-bench")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--skip-train", action="store_true", help="part 1 only")
    p.add_argument("--calibration", action="store_true", help="also part 3: the cost and gain of train --calibrate")
    p.add_argument("--digits", action="store_true", help="part 3 also on the default digits run")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    cache = out / "mixtures-v2.json"  # (v1 held only the table rows of five processes)
    if cache.is_file():
        mix = json.loads(cache.read_text())
    else:
        mix = part_mixtures()
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(mix))
    choice, rows = grid_rows(mix)
    print("\n## part 1: held-out exact mixtures, RMSE to the exact PF-ODE solution on each process's own range; "
          "score = geometric mean of error / best candidate's (1 = best everywhere); top 3, then dpmpp_2m on native "
          "and on its best grid")
    print(table(rows, [(k, k, 3) for k in rows[0]]))
    print("dpmpp_2m's best grid per process: " + ", ".join(f"{k} {v}" for k, v in choice.items())
          + "; the defaults (--grid auto): " + ", ".join(f"{k} {default_grid(k)}" for k in RECIPES))
    moons = floor = None
    if not args.skip_train:
        floor, moons = part_moons(out, args.steps, args.n)
        print(f"\ndata-vs-data floor (two fresh sets of {args.n}): {floor:.4f}")
    chosen, srows = choose_samplers(mix, moons, floor)
    cols = [("process", "process", 0), ("grid", "grid", 0), ("sampler", "sampler", 0), ("score", "score", 3),
            ("worst", "worst", 2), ("mixtures", "mixtures only", 3), ("worst mixture", "worst mixture", 2)]
    if moons is not None:
        cols += [(f"moons @{k} x floor", f"moons @{k} x floor", 2) for k in NFES]
    cells = "the 8 mixture cells" + (" and the 2 moons cells" if moons else "")
    print(f"\n## the sampler on each process's default grid: score = geometric mean over {cells} of error / best "
          f"sampler's; worst = the largest such ratio; default = the best score with worst <= {WORST_BAR}")
    print(table(srows, cols + [("chosen", "", 0)]))
    print("default (sampler, NFE) per process: " + ", ".join(f"{k} {s}@{n}" for k, (s, n) in chosen.items()))
    code = {k: tuple(processes.PROCESSES[k]().default_sampling) for k in RECIPES}
    differ = {k: code[k] for k in RECIPES if code[k] != chosen[k]}
    print("processes.*.default_sampling (what --sampler auto records): "
          + ("the same" if not differ else f"DIFFERENT for {differ}: update processes.py"))
    if moons is not None:
        rows = old_vs_new(moons, floor, chosen)
        print("\n## moons, sliced W2 / data floor with each generation of defaults")
        print(table(rows, [(k, k, 2) for k in rows[0]]))
        bad = [r["process"] for r in rows if r["x floor"] > FLOOR_BAR]
        print(f"regression bar (every process within {FLOOR_BAR}x the floor): "
              + ("met" if not bad else f"MISSED: {bad}"))
    if args.calibration:
        rows = part_calibration(out, args.steps, args.n, args.digits)
        print("\n## part 3: train --calibrate, cost (CPU seconds of one-thread processes) and gain")
        print(table(rows, [("model", "model", 0), ("default", "default", 0), ("train CPU s", "train CPU s", 1),
                           ("calibrate CPU s", "calibrate CPU s", 1),
                           ("calibration / training", "calibration / training", 2),
                           ("calibration wall s", "calibration wall s", 1), ("skip CPU s", "resumed again CPU s", 1),
                           ("held-out RMSE x", "held-out RMSE vs best baseline", 2), ("metric", "metric", 0),
                           ("default only", "default", 4), ("default + calibrated", "default + calibrated", 4)]))
        noise = w2_noise(out / "calibrated-edm", args.n)
        print(f"seed noise of sliced W2 / floor (blocks of {args.n}): "
              + "; ".join(f"{k} " + " ".join(f"{v:.2f}" for v in vals) for k, vals in noise.items())
              + " (EDM, seeds 0.., the same seeds with and without the calibrated grid)")


if __name__ == "__main__":
    main()
