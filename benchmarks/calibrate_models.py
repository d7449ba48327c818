"""Calibrated grids on trained models: FID at low NFE with grids fitted to the model
(`uf.samplers.calibrate`) against the fixed recipes, and an overfitting check on class labels.

    .venv/bin/python benchmarks/calibrate_models.py [--runs runs/digits runs/moons] [--nfes 4,5,6,8,10]

For each run and NFE: calibrate the sampler's grid on 64 noises (reference: dopri5, rtol 1e-6),
then draw N samples (seeds 0..N-1, which the calibration never saw) with each grid and score them
as `unifusion eval` does. Baselines: karras and tuned for models that start at a finite sigma_max;
uniform_t (the native grid) and sd3 for flow models, which start at sigma = inf. For
class-conditional models, a grid fitted on labels 0-4 is also measured on labels 5-9 (held-out RMSE
against the reference) beside the grid fitted on every label.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from unifusion import models
from unifusion.evaluation import evaluate as E
from unifusion.samplers.calibrate import calibrate


def float64(model):
    def den(x, sigma, **c):  # solver state in float64, the network in float32
        return model.denoise(x.float(), sigma.float(), **c).double()
    return den


def labels_cond(k: int, fit: list[int], val: list[int]):
    def cond(split, n):
        labels = fit if split == "fit" else val
        return {"y": torch.tensor([labels[i % len(labels)] for i in range(n)])}
    return cond if k else None


def run_model(run: str, sampler: str, nfes: list[int], n: int, n_ref: int) -> dict:
    model = models.load(run)
    spec = model.spec
    k = spec.num_classes
    lo, hi = spec.sigma_range()
    baselines = ["uniform_t", "sd3"] if math.isinf(hi) else ["karras", "tuned"]
    ref = E.reference(spec.data["source"], spec.data.get("options", {}), E.feature_extractor(spec.shape),
                      E.run_dir(run) / "eval")
    every = list(range(k))
    rows, cals = [], {}
    for nfe in nfes:
        cal = calibrate(float64(model), spec.shape, sampler, nfe, sigma_min=lo, sigma_max=hi, n_ref=n_ref,
                        n_val=n_ref, cond=labels_cond(k, every, every), process=model.process, seed=1)
        cals[nfe] = cal
        fids = {}
        for g in baselines + ["calibrated"]:
            r = E.evaluate(model, ref, sampler, nfe, n, cal if g == "calibrated" else g)
            fids[g] = r.fid
        rows.append({"nfe": nfe, "fid": fids, "rmse_val": cal.rmse_val,
                     "seconds": sum(cal.seconds.values()), "sigmas": cal.sigmas.tolist()})
        print(f"  {run} {sampler} NFE {nfe}: " + ", ".join(f"{g} FID {f:.4f}" for g, f in fids.items())
              + f"; calibration {rows[-1]['seconds']:.1f} s", flush=True)
    overfit = None
    if k >= 2:
        half = k // 2
        nfe = nfes[len(nfes) // 2]
        cond = labels_cond(k, list(range(half)), list(range(half, k)))
        t0 = time.perf_counter()
        split = calibrate(float64(model), spec.shape, sampler, nfe, sigma_min=lo, sigma_max=hi, n_ref=n_ref,
                          n_val=n_ref, cond=cond, process=model.process, seed=1)
        overfit = {"nfe": nfe, "fit_labels": f"0-{half - 1}", "val_labels": f"{half}-{k - 1}",
                   "rmse_val": split.rmse_val, "seconds": time.perf_counter() - t0}
    return {"run": run, "sampler": sampler, "baselines": baselines, "rows": rows, "overfit": overfit, "n": n}


def table(res: dict) -> str:
    b = res["baselines"]
    head = "| NFE | " + " | ".join(f"FID {g}" for g in b) + " | FID calibrated | calibration s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in res["rows"]:
        lines.append(f"| {r['nfe']} | " + " | ".join(f"{r['fid'][g]:.4f}" for g in b)
                     + f" | {r['fid']['calibrated']:.4f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["runs/digits", "runs/moons"])
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--nfes", default="4,5,6,8,10")
    p.add_argument("--n", type=int, default=1500, help="samples per FID")
    p.add_argument("--n-ref", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    nfes = [int(v) for v in args.nfes.split(",")]
    results = []
    for run in args.runs:
        res = run_model(run, args.sampler, nfes, args.n, args.n_ref)
        results.append(res)
        print(f"\n## {run}: {args.sampler}, FID of {args.n} samples (seeds 0..{args.n - 1})\n")
        print(table(res))
        if res["overfit"]:
            o = res["overfit"]
            print(f"\noverfitting check, NFE {o['nfe']}: grid fitted on labels {o['fit_labels']}, held-out RMSE on "
                  f"labels {o['val_labels']}: " + ", ".join(f"{g} {v:.3e}" for g, v in o["rmse_val"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
