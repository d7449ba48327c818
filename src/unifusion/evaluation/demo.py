"""The embedded demo: sample an exact 2-D Gaussian mixture with several samplers, draw the samples
and each sampler's error against the exact PF-ODE solution as a function of NFE."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import unifusion as uf
from unifusion.evaluation.mixture import GaussianMixture

SCATTER = [("euler", 10), ("heun", 10), ("dpmpp_2m", 10), ("unipc", 10), ("ddpm", 100), ("pc", 200)]
CURVES = ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "lms", "ipndm"]
NFES = [4, 6, 8, 10, 15, 20, 30, 50, 100]


def run(out: str = "runs/demo", n: int = 2000, seed: int = 0) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    gm = GaussianMixture.random(2, 6, seed=seed, spread=2.5)
    truth = gm.sample(n, torch.Generator().manual_seed(seed))[0]
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) * 80.0
    print(f"exact 2-D mixture, {gm.K} components; reference PF-ODE solve (DOP853, tol 1e-12) ...", flush=True)
    ref = gm.pf_ode(noise[:256], 80.0, 0.0)

    fig, axes = plt.subplots(1, len(SCATTER) + 1, figsize=(3 * (len(SCATTER) + 1), 3.2), sharex=True, sharey=True)
    panels = [("exact samples", truth)] + [
        (f"{name}, {nfe} NFE", uf.sample(gm.denoise, noise, name, nfe=nfe, generator=torch.Generator().manual_seed(seed)))
        for name, nfe in SCATTER]
    for ax, (title, pts) in zip(axes, panels):
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4, color="tab:blue" if title.startswith("exact") else "tab:orange")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    lim = float(truth.abs().max()) * 1.15
    axes[0].set_xlim(-lim, lim), axes[0].set_ylim(-lim, lim)
    fig.tight_layout()
    samples_png = out_dir / "samples.png"
    fig.savefig(samples_png, dpi=110)
    plt.close(fig)

    errors = {}
    for name in CURVES:
        errors[name] = []
        for nfe in NFES:
            x = uf.sample(gm.denoise, noise[:256], name, nfe=nfe)
            errors[name].append(float(((x - ref) ** 2).mean().sqrt()))
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, errs in errors.items():
        ax.loglog(NFES, errs, marker="o", ms=3, label=name)
    ax.set_xlabel("denoiser calls (NFE)")
    ax.set_ylabel("RMSE vs exact PF-ODE solution")
    ax.set_title("Samplers on an exact 2-D Gaussian mixture (sigma 80 -> 0)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    error_png = out_dir / "error_vs_nfe.png"
    fig.savefig(error_png, dpi=110)
    plt.close(fig)

    table = out_dir / "error_vs_nfe.json"
    table.write_text(json.dumps({"nfe": NFES, "rmse": errors}, indent=1))
    print(f"{'sampler':10s}" + "".join(f"{n:>9d}" for n in NFES))
    for name, errs in errors.items():
        print(f"{name:10s}" + "".join(f"{e:9.1e}" for e in errs))
    print(f"\ndone in {time.time() - t0:.1f} s. Outputs:\n  samples:        {samples_png}\n"
          f"  error vs NFE:   {error_png}\n  numbers:        {table}")
    return {"samples": str(samples_png), "error_vs_nfe": str(error_png), "table": str(table)}
